"""Phantom datasets made on the spot, for the demos and the tests: BraTS cases (brats.py) and MSD
hippocampus cases (msd.py) with known answers."""
