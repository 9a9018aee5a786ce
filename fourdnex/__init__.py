"""fourdnex: feed-forward image-to-4D generation (RGB + XYZ pointmap video) on Wan2.1-I2V."""

__version__ = "0.1.0"
