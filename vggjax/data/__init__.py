"""The data layer: sources (TFDS array_record, an image folder, digits/MNIST/Fashion-MNIST in memory), host
transforms (decode, isotropic rescale, crops, flips; uint8 out) and the deterministic, resumable Grain
pipeline. ``pipeline`` is the entry point; ``prepare`` holds the dataset commands (statistics, tfrecord to
array_record). The arithmetic (cast, mean subtraction, colour shift) runs on the device:
``vggjax.preprocessing``."""
