"""The SAM model core: zoo and safe checkpoint loading, preprocessing, the batched predictor."""
