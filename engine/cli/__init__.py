"""The onnxdream command: one module per group of subcommands."""
