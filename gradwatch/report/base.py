"""Former home of the sink interface and the run statistics; kept so old imports work.

The sink interface and fan-out live in :mod:`gradwatch.report.sink`, the run statistics in
:mod:`gradwatch.report.stats`, the windowed-sink base in :mod:`gradwatch.report.windowed`.
"""

from gradwatch.layers import layer_of
from gradwatch.report.sink import NEVER, Sink, SinkGroup, _outside_gradwatch, window_due
from gradwatch.report.stats import StepAggregator

__all__ = ["NEVER", "Sink", "SinkGroup", "StepAggregator", "layer_of", "window_due"]
__all__ += ["_outside_gradwatch"]
