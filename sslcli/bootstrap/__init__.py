"""Neighbour bootstrapping: choosing the image the second view is cropped from."""
