"""Local Storage stand-in: the subset of Supabase Storage's REST API that storage3 and storage-js call.

Objects live at `SPOOL_HOME/storage/{bucket}/{key}`, their content type and cache control beside them under
`SPOOL_HOME/storage/.meta/`. Object routes need the service key (`apikey` or `Authorization: Bearer`); signed
URLs carry an HMAC-SHA256 token (key derived from the service key) bound to purpose, bucket, key and expiry.
Errors have Storage's JSON shape (`{"statusCode", "code", "error", "message"}`), so storage3 and storage-js raise
StorageApiError with Storage's own status and code. Resumable uploads (TUS) with a signed upload token are in
resumable.py.
"""

from lib.local.storage.resumable import ExposeTusHeaders
from lib.local.storage.resumable import router as resumable_router
from lib.local.storage.routes import router

__all__ = ["ExposeTusHeaders", "resumable_router", "router"]
