"""Billing."""

from fastapi import APIRouter

router = APIRouter(prefix="/billing", tags=["Billing"])
