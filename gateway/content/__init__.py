"""Video content: ``GET|HEAD /v1/videos/{task_id}/content`` (SPEC section 10) and the archive that outlives the
upstream's URL.

Pure decisions (``origin``: which URL may be fetched with which credentials; ``ranges``: the Range header) apart
from I/O (``fetch``: the streaming fetch with re-checked redirects; ``archive_*``: the stores; ``archiver``: the
background copier; ``service``: one answer to one request).
"""
