"""Built-in example tasks; every data set is made locally or shipped by a package.

- digits: an MLP on scikit-learn's 8x8 digits.
- cnn: a small CNN with BatchNorm classifying generated 32x32 images.
- unet: a small U-Net segmenting generated shapes.
- charlm: a tiny transformer character model on Python's standard library source.
"""
