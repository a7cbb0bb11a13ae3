import six

print("hello from demo_python, six", six.__version__)
