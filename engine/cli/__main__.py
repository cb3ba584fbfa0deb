"""``python -m onnxdream.cli``: the onnxdream command."""

from onnxdream.cli.main import main

if __name__ == "__main__":
    main()
