"""Image sources: where calibration images come from and how they are decoded.

``items`` holds what every source yields (:class:`RawItem`, the image extensions);
``stream`` the local sources (JSON lists, folders), decoding with a pixel cap, the streaming
dataset and batching; ``shards`` webdataset tar shards (local or remote); ``hf`` Hugging Face
datasets and parquet. A new data source is one file here, opened from
:func:`dymu.sources.stream.open_source`. Nothing here knows about models.
"""
