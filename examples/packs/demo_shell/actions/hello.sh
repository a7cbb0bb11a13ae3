#!/bin/sh
echo "hello from demo_shell: shell packs need no environment"
