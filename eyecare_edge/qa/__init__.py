"""Question-answer records: the Eyecare-Bench format (and the LLaVA JSON it also reads), its
loaders and the parsers of a model's answers (option letters, yes/no).

Torch-free and shared: the bench scores them, training and calibration read them as data, perf
asks them. It is its own package so that none of those rooms reaches into the bench's internals.
"""
