"""Local Supabase Realtime subset: postgres_changes over Phoenix channels at /realtime/v1/websocket.

protocol (frames), bindings (subscriptions and filters), channels (joined channels,
claims, registry), feed (Postgres change feed, RLS checks, fan-out), socket (the route).
"""

from lib.local.realtime.socket import router

__all__ = ["router"]
