"""vggjax: the VGG paper (Simonyan & Zisserman, 2014) in JAX/Flax, from one CPU to a pod."""

__version__ = '0.1.0'
