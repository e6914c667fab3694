"""What people look at: the HTML report with image grids, and the figures."""

from .._util.lazy import lazy_exports

_EXPORTS = {
    "metrics_figure": "._figures",
    "sizes_figure": "._figures",
    "headless_pyplot": "._figures",
    "build_report": "._page",
    "Report": "._page",
    "TILE": "._page",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
