"""The contract between the API process and its engine workers: imported by both, importing neither.

``wire``: the frames on the socket pair; ``errors``: the exceptions a call can end with and the one table that
maps them to frames and HTTP; ``sampling``: the one sampling schema and the engine's ranges.
"""
