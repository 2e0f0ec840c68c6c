"""The indexing pipeline: scan -> decode/preprocess -> embed -> write, each stage its own module.

Stages exchange plain data (ScanEntry, WorkItem, DecodeResult, numpy arrays) so they can run in
other processes or, later, on other machines.
"""
