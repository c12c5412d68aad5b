"""Materializers that move artifact folders through the ZenML artifact store (local or remote)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, ClassVar

from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from llmtune.artifacts import Adapter, ArtifactDir, EvalReport, MergedModel, PreparedData, QuantizedBase
from llmtune.evaluate.scoring import samples_html


class _DirectoryIO:
    """Copy a folder into the artifact store and back; shared by the materializers below."""

    uri: str

    def save(self, data: ArtifactDir) -> None:
        for root, _, files in os.walk(data.path):
            target = os.path.join(self.uri, os.path.relpath(root, data.path))
            fileio.makedirs(target)
            for name in files:
                fileio.copy(os.path.join(root, name), os.path.join(target, name), overwrite=True)

    def load(self, data_type: type[Any]) -> ArtifactDir:
        if os.path.isdir(self.uri):  # local artifact store: read in place, never written to
            return data_type(self.uri)
        local = tempfile.mkdtemp(prefix="llmtune-artifact-")
        for root, _, files in fileio.walk(self.uri):
            rel = os.path.relpath(str(root), self.uri)
            os.makedirs(os.path.join(local, rel), exist_ok=True)
            for name in files:
                fileio.copy(os.path.join(str(root), str(name)), os.path.join(local, rel, str(name)))
        return data_type(local)

    def extract_metadata(self, data: ArtifactDir) -> dict[str, Any]:
        sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(data.path) for f in fs]
        return {"files": len(sizes), "size_bytes": sum(sizes)}


class DataDirMaterializer(_DirectoryIO, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (PreparedData,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save_visualizations(self, data: PreparedData) -> dict[str, VisualizationType]:
        """The preparation report (counts, token-length histogram, a marked example) in the dashboard."""
        report = os.path.join(self.uri, PreparedData.REPORT)
        return {report: VisualizationType.HTML} if fileio.exists(report) else {}


class ModelDirMaterializer(_DirectoryIO, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (QuantizedBase, Adapter, MergedModel)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL


class EvalReportMaterializer(BaseMaterializer):
    """The evaluate step's report as JSON, with its samples table (base vs tuned answers) as the visualization."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (EvalReport,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def load(self, data_type: type[Any]) -> EvalReport:
        with fileio.open(os.path.join(self.uri, EvalReport.FILE), "r") as f:
            return EvalReport(json.loads(f.read()))

    def save(self, data: EvalReport) -> None:
        with fileio.open(os.path.join(self.uri, EvalReport.FILE), "w") as f:
            f.write(json.dumps(data, indent=1))

    def save_visualizations(self, data: EvalReport) -> dict[str, VisualizationType]:
        page = os.path.join(self.uri, EvalReport.PAGE)
        with fileio.open(page, "w") as f:
            f.write(samples_html(data))
        return {page: VisualizationType.HTML}

    def extract_metadata(self, data: EvalReport) -> dict[str, Any]:
        return {"samples": len(data.get("samples", []))}
