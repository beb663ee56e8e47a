"""`tvq serve` (docs/DESIGN.md section 13): `ServerSettings`, the `Engine` that runs the
model, and `build_app`, the HTTP application over it. Names load on first use (PEP 562).
"""

from tvq import lazy_exports

_EXPORTS = {
    "ServerSettings": "tvq.serving.protocol",
    "Engine": "tvq.serving.engine",
    "build_app": "tvq.serving.app",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
