"""The live line page: what each line sees (frames, heatmaps, scores against the threshold, alerts),
with "not a defect" / "defect" and "reset line" buttons. Off unless ui.port is set."""

from musc_stream.service.ui.board import VERDICTS, Board
from musc_stream.service.ui.server import LinePage, LinePageBindError

__all__ = ["VERDICTS", "Board", "LinePage", "LinePageBindError"]
