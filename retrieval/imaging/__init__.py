"""What a file becomes: scanning, reading and hashing, decoding and preprocessing, perceptual hashes,
crash-isolated decoding and parallel decoding of a file list.

The indexer, curation's folder embedding and the API's uploads all go through these modules; none of
them imports the indexer or the API.
"""
