"""The modules' parameter nodes: the panel selections live in the scene, so they are saved with it and restored
when it is loaded (Slicer's convention, as ``slicer.parameterNodeWrapper`` does it).

A small adapter over the same ``vtkMRMLScriptedModuleNode`` singleton that ``ScriptedLoadableModuleLogic.
getParameterNode()`` returns (singleton tag and ``ModuleName`` attribute = the module name). It is used instead
of ``parameterNodeWrapper`` because that needs Qt, and this one runs headless on slicer-core, where the tests
save a scene and load it back. Node selections are node references; everything else is a string parameter.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import slicer

SEGMENT_REFERENCES = ("InputVolume", "OutputSegmentation", "ROI")
SEGMENT_DEFAULTS = {"Model": "demo", "Device": "auto", "Fast": "false"}
TRAIN_REFERENCES = ("TrainingVolume", "TrainingSegmentation")
TRAIN_DEFAULTS = {"Mode": "finetune", "Preset": "T", "Epochs": "100", "CropSize": "96", "LearningRate": "0.0001",
                  "Device": "auto", "ModelName": "", "Resume": "false"}


class ParameterNode:
    """Typed-enough access to one module's ``vtkMRMLScriptedModuleNode``."""

    def __init__(self, node, references=(), defaults: Optional[Mapping[str, str]] = None) -> None:
        self.node = node
        self.references = tuple(references)
        self.defaults: Dict[str, str] = dict(defaults or {})
        self.set_defaults()

    @classmethod
    def for_module(cls, module_name: str, scene=None, references=(), defaults=None) -> "ParameterNode":
        """The module's parameter node in ``scene`` (created the first time, like ``getParameterNode()``)."""
        scene = scene or slicer.mrmlScene
        node = scene.GetSingletonNode(module_name, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(module_name)
            node.SetName(scene.GenerateUniqueName(f"{module_name} parameters"))
            node.SetAttribute("ModuleName", module_name)
            node.SetHideFromEditors(True)
            scene.AddNode(node)
        return cls(node, references, defaults)

    def set_defaults(self) -> None:
        """Fill the parameters that are not set (a new node, or one reset by closing the scene)."""
        for name, value in self.defaults.items():
            if not self.node.GetParameter(name):
                self.node.SetParameter(name, value)

    # values --------------------------------------------------------------------------------------------
    def get(self, name: str) -> str:
        value = self.node.GetParameter(name)
        return value if value else self.defaults.get(name, "")

    def set(self, name: str, value) -> None:
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if self.node.GetParameter(name) != text:
            self.node.SetParameter(name, text)

    def get_bool(self, name: str) -> bool:
        return self.get(name) == "true"

    # node selections -----------------------------------------------------------------------------------
    def node_ref(self, role: str):
        return self.node.GetNodeReference(role)

    def set_node_ref(self, role: str, node) -> None:
        node_id = node.GetID() if node is not None else None
        if self.node.GetNodeReferenceID(role) != node_id:
            self.node.SetNodeReferenceID(role, node_id)


def segment_parameters(scene=None) -> ParameterNode:
    return ParameterNode.for_module("LoGoNetSegment", scene, SEGMENT_REFERENCES, SEGMENT_DEFAULTS)


def train_parameters(scene=None) -> ParameterNode:
    return ParameterNode.for_module("LoGoNetTrain", scene, TRAIN_REFERENCES, TRAIN_DEFAULTS)


__all__ = ["ParameterNode", "segment_parameters", "train_parameters", "SEGMENT_DEFAULTS", "TRAIN_DEFAULTS"]
