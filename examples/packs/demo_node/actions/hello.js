const isNumber = require('is-number');
console.log('hello from demo_node, is-number(42) =', isNumber(42));
