"""Export of quantized models to deployment formats (ONNX with QDQ and integer weights)."""

from .onnx import ExportReport, QuantizerExport, to_onnx

__all__ = ["ExportReport", "QuantizerExport", "to_onnx"]
