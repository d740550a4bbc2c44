"""Projects."""

from fastapi import APIRouter

router = APIRouter(prefix="/projects", tags=["Projects"])
