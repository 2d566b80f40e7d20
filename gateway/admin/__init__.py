"""The admin HTTP listener: health, readiness and Prometheus metrics."""

from __future__ import annotations

from gateway.admin.app import admin_app
from gateway.admin.exposition import GatewayState, gateway_registry
from gateway.admin.listener import AdminConfigError, AdminListener, check_admin_settings
from gateway.admin.readiness import ReadinessChecks

__all__ = [
    "AdminConfigError",
    "AdminListener",
    "GatewayState",
    "ReadinessChecks",
    "admin_app",
    "check_admin_settings",
    "gateway_registry",
]
