#!/bin/sh
# Remake the README's pictures from their commands (examples/README.md lists each one), with the
# current defaults. Run from the repository root with onnxdream[video] installed:
#   sh examples/make_examples.sh            (about 10 minutes on a 2-core CPU)
# The 2048-px comparison, from examples/astronaut.png (scikit-image's sample data, public domain):
#   python examples/make_size_example.py examples/astronaut.png -o examples/size-2048.jpg
set -eu
E=examples
mkdir -p out
onnxdream dream $E/chelsea.png -o $E/chelsea-dream.png --seed 7 -q
onnxdream dream $E/coffee.png -o $E/coffee-dream.jpg --seed 7 -q
onnxdream dream $E/coffee.png --keep-colors -o $E/coffee-keep-colors.jpg --seed 7 -q
onnxdream dream $E/chelsea.png --mask $E/chelsea-mask.png -o $E/chelsea-masked.jpg --seed 7 -q
onnxdream dream $E/chelsea.png --guide $E/coffee.png -o $E/chelsea-guided.jpg --seed 7 -q
onnxdream dream --init grey --size 256x256 --seamless --layer blocks.9 --steps 20 \
    --step-size 0.01 -o $E/texture.jpg --seed 7 -q
onnxdream atlas --cell 160 -o $E/atlas.png --seed 0 -q
onnxdream visualize --class 130,340,954,281,9 --grid --seed 0 -o $E/visualize-grid.png -q
onnxdream zoom $E/chelsea.png -o $E/chelsea-zoom.gif --frames 60 --width 216 --zoom 1.04 \
    --rotate 0.5 --fps 12 --seed 7 -q
python $E/make_pan_clip.py -o out/pan.mp4
onnxdream video out/pan.mp4 -o $E/pan-dream.gif --width 216 --seed 7 -q
