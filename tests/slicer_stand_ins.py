"""A 3D Slicer application for tests: the real MRML of slicer-core plus stand-ins for what it lacks.

slicer-core (``pip install slicer-core``, Kitware) is Slicer's own C++ MRML, logic and I/O classes without Qt: the
scene, nodes, storage nodes, the volumes logic with vtkITK's readers, subject hierarchy, and a copy of
``slicer/util.py``. Everything Slicer builds on Qt is missing. ``slicer_application()`` builds a scene with the
application, colour, volumes and subject-hierarchy logics and adds these stand-ins, each as small and as close to
Slicer's behaviour as possible (the Slicer source they restate is named):

- ``slicer.mrmlScene``: the scene; real Slicer sets it at start-up.
- ``slicer.app`` (`Application`): what ``slicer.util`` calls, and ``applicationLogic()`` (the real
  vtkSlicerApplicationLogic). ``coreIOManager()`` (`CoreIOManager`) loads "VolumeFile" as
  qSlicerVolumesReader::load does (through the real vtkSlicerVolumesLogic.AddArchetypeVolume, so vtkITK's
  file-series detection runs) and saves storable nodes as qSlicerNodeWriter::write does (through their real storage
  nodes); ``commandOptions()``, ``exit()`` and ``testingEnabled()`` serve ``util.exit`` and the module's batch and
  testing checks, as in ``Slicer --testing``; ``processEvents()`` does nothing (no event loop).
- ``slicer.app.layoutManager()`` (`LayoutManager`): the Red slice view without its widget: a real slice node and
  vtkMRMLSliceLogic, registered with the application logic as Slicer registers its views' logics, so films are
  shown (and resliced for display) by Slicer's own slice pipeline. The view is VIEW_SIZE_PX pixels.
- ``slicer`` namespace: the names slicer-core copies from ``slicer.util`` into ``slicer`` (``slicer.getNode``...)
  are removed: real Slicer has them only in ``slicer.util``, and module code that used them would fail there.
- ``slicer.i18n``: ``tr`` and ``translate`` return the text, as Slicer does with no translation installed.
- ``slicer.ScriptedLoadableModule``: the four base classes (Slicer's Base/Python/slicer/ScriptedLoadableModule.py);
  the logic's parameter-node handling and the test's ``delayDisplay`` as in Slicer; the module class without its Qt
  icon; the widget class only as a base (a widget needs Qt).
- ``slicer.parameterNodeWrapper``: ``parameterNodeWrapper``, ``WithinRange`` and ``Choice`` for the types the
  modules use (float, int, bool, str, MRML nodes), stored in the parameter node as Slicer's serializers store them
  and validated on every write (defaults included); values are read from the node each time (Slicer caches them).
- ``qt``: an empty module. CT2XSynth.py and CT2XReconstruct.py import it for their widgets; the logics, the
  self-tests and ``util.delayDisplay`` below 400 ms never use it.
- Subject hierarchy (`SubjectHierarchyPluginLogic`): an item for every added volume, transform or table node, removed
  with its node, and the hierarchy resolved after a scene close, as qSlicerSubjectHierarchyPluginLogic does (it is
  Qt code, so slicer-core has no items for new nodes).
- The Colors logic is the base vtkMRMLColorLogic registered with the application logic (without it every volume
  load logs an error); Slicer's vtkSlicerColorLogic adds colour tables from files that slicer-core does not ship.

`MRMLLog` collects the VTK errors and warnings (MRML reports problems through them, not exceptions).
"""

from __future__ import annotations

import contextlib
import sys
import types
import typing
import unittest
from pathlib import Path
from typing import Iterator, List, Optional

import vtk

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "CT2XSynth"
RECONSTRUCT_MODULE_DIR = ROOT / "CT2XReconstruct"
MODULE_DIRS = (MODULE_DIR, RECONSTRUCT_MODULE_DIR)  # on sys.path, as Slicer's module paths
ISOLATED_MODULES = ("slicer", "qt", "CT2XSynth", "CT2XSynthLib", "CT2XReconstruct",
                    "CT2XReconstructLib")  # with their submodules
SUBJECT_HIERARCHY_PLUGINS = (("vtkMRMLScalarVolumeNode", "Volumes"), ("vtkMRMLTransformNode", "Transforms"),
                             ("vtkMRMLTableNode", "Tables"))
SLICE_VIEWS = ("Red",)  # the view CT2XSynth shows films in
VIEW_SIZE_PX = (320, 240)  # width, height of each slice view


def _slicer():
    """The slicer module in use (imported when the application starts, not when this file is imported)."""
    return sys.modules["slicer"]


class MRMLLog:
    """VTK error and warning messages, as MRML reports problems (load failures, missing logics)."""

    def __init__(self) -> None:
        self.messages: List[str] = []
        self._window = vtk.vtkOutputWindow.GetInstance()
        self._tags = [self._window.AddObserver(event, self._on_message)
                      for event in (vtk.vtkCommand.ErrorEvent, vtk.vtkCommand.WarningEvent)]

    @vtk.calldata_type(vtk.VTK_STRING)
    def _on_message(self, caller, event, text) -> None:
        self.messages.append(text.strip())

    def close(self) -> None:
        for tag in self._tags:
            self._window.RemoveObserver(tag)


class SubjectHierarchyPluginLogic:
    """Subject-hierarchy items for data nodes, as qSlicerSubjectHierarchyPluginLogic makes them."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self._tags = [scene.AddObserver(scene.NodeAddedEvent, self.onNodeAdded),
                      scene.AddObserver(scene.NodeAboutToBeRemovedEvent, self.onNodeAboutToBeRemoved),
                      scene.AddObserver(scene.EndCloseEvent, self.onSceneCloseEnded)]

    def close(self) -> None:
        for tag in self._tags:
            self.scene.RemoveObserver(tag)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, scene, event, node) -> None:
        """A new data node gets an item under the scene item, if a core plugin owns its class."""
        slicer = _slicer()
        if node.IsA("vtkMRMLSubjectHierarchyNode"):
            slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
            return
        if scene.IsImporting() or node.GetHideFromEditors():
            return
        plugin = next((name for className, name in SUBJECT_HIERARCHY_PLUGINS if node.IsA(className)), None)
        if plugin:
            shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
            shNode.CreateItem(shNode.GetSceneItemID(), node, plugin)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAboutToBeRemoved(self, scene, event, node) -> None:
        """A removed data node takes its item with it (not during a scene close, which clears the hierarchy)."""
        if scene.IsClosing() or node.IsA("vtkMRMLSubjectHierarchyNode"):
            return
        shNode = _slicer().vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        itemID = shNode.GetItemByDataNode(node)
        if itemID:
            shNode.RemoveItem(itemID, False, False)

    def onSceneCloseEnded(self, scene, event) -> None:
        """The close removed the hierarchy node; a new one is made."""
        _slicer().vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)


class CoreIOManager:
    """qSlicerCoreIOManager for volumes: the "VolumeFile" reader and the node writer."""

    VOLUME_FILE = "VolumeFile"

    def __init__(self, scene, applicationLogic, volumesLogic) -> None:
        self.scene = scene
        self.applicationLogic = applicationLogic
        self.volumesLogic = volumesLogic

    def loadNodes(self, fileType: str, properties: dict, loadedNodes, userMessages) -> bool:
        """qSlicerVolumesReader::load: the node is named after the file up to its first dot (QFileInfo::baseName)."""
        if fileType != self.VOLUME_FILE:
            userMessages.AddMessage(vtk.vtkCommand.ErrorEvent, f"no reader for file type {fileType!r} here")
            return False
        fileName = str(properties["fileName"])
        name = properties.get("name", Path(fileName).name.split(".")[0])
        options = sum(bit for key, bit in (("labelmap", 0x1), ("center", 0x2), ("singleFile", 0x4),
                                           ("autoWindowLevel", 0x8), ("discardOrientation", 0x10))
                      if properties.get(key, False))
        fileList = None
        if "fileNames" in properties:
            fileList = vtk.vtkStringArray()
            for path in properties["fileNames"]:
                fileList.InsertNextValue(str(path))
        node = self.volumesLogic.AddArchetypeVolume(fileName, name, options, fileList)
        if node is None:
            return False
        if properties.get("colorNodeID") and node.GetVolumeDisplayNode():
            node.GetVolumeDisplayNode().SetAndObserveColorNodeID(properties["colorNodeID"])
        if properties.get("show", True):
            selectionNode = self.applicationLogic.GetSelectionNode()
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                selectionNode.SetActiveLabelVolumeID(node.GetID())
            else:
                selectionNode.SetActiveVolumeID(node.GetID())
            self.applicationLogic.PropagateVolumeSelection()
        loadedNodes.AddItem(node)
        return True

    def fileWriterFileType(self, node) -> str:
        return self.VOLUME_FILE if node.IsA("vtkMRMLVolumeNode") else "NoFile"

    def saveNodes(self, fileType: str, properties: dict, userMessages) -> bool:
        """qSlicerNodeWriter::write: the node's storage node (its default one if it has none) writes the file."""
        node = self.scene.GetNodeByID(properties["nodeID"])
        if fileType != self.fileWriterFileType(node):
            userMessages.AddMessage(vtk.vtkCommand.ErrorEvent, f"no writer for file type {fileType!r} here")
            return False
        storageNode = node.GetStorageNode()
        if storageNode is None and node.AddDefaultStorageNode():
            storageNode = node.GetStorageNode()
        if storageNode is None:
            return False
        storageNode.SetFileName(str(properties["fileName"]))
        storageNode.SetURI(None)
        if "useCompression" in properties:
            storageNode.SetUseCompression(int(properties["useCompression"]))
        return bool(storageNode.WriteData(node))


class SliceWidget:
    """qMRMLSliceWidget's MRML side: its slice node and slice logic."""

    def __init__(self, sliceLogic) -> None:
        self._sliceLogic = sliceLogic

    def mrmlSliceNode(self):
        return self._sliceLogic.GetSliceNode()

    def sliceLogic(self):
        return self._sliceLogic


class LayoutManager:
    """The slice views of SLICE_VIEWS: a slice node and logic each, as Slicer's layout creates them."""

    def __init__(self, scene, applicationLogic) -> None:
        slicer = _slicer()
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # as qSlicerCoreApplication does
        sliceLogics = vtk.vtkCollection()
        self._sliceWidgets = {}
        for name in SLICE_VIEWS:
            sliceLogic = slicer.vtkMRMLSliceLogic()
            sliceLogic.SetMRMLApplicationLogic(applicationLogic)
            sliceLogic.SetMRMLScene(scene)
            sliceLogic.AddSliceNode(name).SetDimensions(*VIEW_SIZE_PX, 1)
            sliceLogics.AddItem(sliceLogic)
            self._sliceWidgets[name] = SliceWidget(sliceLogic)
        applicationLogic.SetSliceLogics(sliceLogics)

    def sliceWidget(self, name: str) -> Optional[SliceWidget]:
        return self._sliceWidgets.get(name)

    def sliceViewNames(self) -> List[str]:
        return list(self._sliceWidgets)

    def mrmlSliceLogics(self):
        """The slice logics, a vtkCollection (slicer.util.setSliceViewerLayers fits them)."""
        sliceLogics = vtk.vtkCollection()
        for sliceWidget in self._sliceWidgets.values():
            sliceLogics.AddItem(sliceWidget.sliceLogic())
        return sliceLogics


class Application:
    """``slicer.app``: what slicer.util and the module call, as in ``Slicer --testing``."""

    def __init__(self, scene, applicationLogic, volumesLogic) -> None:
        self._applicationLogic = applicationLogic
        self._ioManager = CoreIOManager(scene, applicationLogic, volumesLogic)
        self._layoutManager = LayoutManager(scene, applicationLogic)
        self._commandOptions = types.SimpleNamespace(noMainWindow=False, runPythonAndExit=False)
        self.exitCode: Optional[int] = None  # set by exit(), which ends the event loop in Slicer

    def applicationLogic(self):
        return self._applicationLogic

    def coreIOManager(self) -> CoreIOManager:
        return self._ioManager

    def commandOptions(self) -> types.SimpleNamespace:
        return self._commandOptions

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self) -> None:
        """No Qt event loop here: nothing is pending."""

    def layoutManager(self) -> LayoutManager:
        return self._layoutManager

    def exit(self, status: int = 0) -> None:
        self.exitCode = status


# --- slicer.i18n ----------------------------------------------------------------------------------------------


def translate(context: str, text: str) -> str:
    return text


def tr(text: str) -> str:
    return text


# --- slicer.ScriptedLoadableModule ----------------------------------------------------------------------------


class ScriptedLoadableModule:
    """As Slicer's, less the module icon (Qt): registers the module's self-test in ``slicer.selfTests``."""

    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        slicer = _slicer()
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def runTest(self, msec: int = 100, **kwargs) -> None:
        testCase = getattr(sys.modules[self.__module__], self.moduleName + "Test")()
        testCase.messageDelay = msec
        testCase.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    """Base class only: a module panel needs Qt."""


class ScriptedLoadableModuleLogic:
    """As Slicer's, for a singleton parameter node (the kind CT2XSynth uses)."""

    def __init__(self, parent=None) -> None:
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]

    def getParameterNode(self):
        """The module's parameter node, a singleton vtkMRMLScriptedModuleNode created on first use."""
        scene = _slicer().mrmlScene
        parameterNode = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if parameterNode:
            if parameterNode.GetAttribute("ModuleName") != self.moduleName:
                parameterNode.SetAttribute("ModuleName", self.moduleName)  # a scene close may have removed it
            return parameterNode
        return scene.AddNode(self.createParameterNode())

    def createParameterNode(self):
        scene = _slicer().mrmlScene
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # the Python variable owns it now
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(scene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    """As Slicer's: ``delayDisplay`` goes to ``slicer.util.delayDisplay`` (which logs the message)."""

    def delayDisplay(self, message: str, requestedDelay: Optional[int] = None, msec: Optional[int] = None) -> None:
        if hasattr(self, "messageDelay"):
            msec = self.messageDelay
        if msec is None:
            msec = requestedDelay
        if msec is None:
            msec = 100
        _slicer().util.delayDisplay(message, msec)


# --- slicer.parameterNodeWrapper ------------------------------------------------------------------------------


class WithinRange:
    """As Slicer's validator: minimum <= value <= maximum."""

    def __init__(self, minimum, maximum) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Choice:
    """As Slicer's validator: the value is one of the choices."""

    def __init__(self, choices) -> None:
        self.choices = choices

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


_NO_DEFAULT = object()


class _Parameter:
    """One field: its serializer (slicer/parameterNodeWrapper/serializers.py) and validators."""

    def __init__(self, name: str, annotation, default) -> None:
        self.name = name
        self.type = annotation
        self.validators = []
        if typing.get_origin(annotation) is typing.Annotated:
            self.type, *self.validators = typing.get_args(annotation)
        self.isNode = isinstance(self.type, type) and issubclass(self.type, _slicer().vtkMRMLNode)
        if not self.isNode and self.type not in (float, int, bool, str):
            raise TypeError(f"{name}: no stand-in serializer for {self.type}")
        self.default = default if default is not _NO_DEFAULT else {
            float: 0, int: 0, bool: False, str: ""}.get(self.type)

    def validate(self, value) -> None:
        allowed = (int, float) if self.type is float else self.type
        if value is None and not self.isNode:
            raise ValueError("Value must not be None")
        if value is not None and not isinstance(value, allowed):
            raise TypeError(f"Value must be of type '{self.type}', is type '{type(value)}' value '{value}'")
        for validator in self.validators:
            validator.validate(value)

    def write(self, parameterNode, value) -> None:
        self.validate(value)
        if self.isNode:
            parameterNode.SetParameter(self.name, "")
            parameterNode.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            parameterNode.SetParameter(self.name, "True" if value else "False")
        else:
            parameterNode.SetParameter(self.name, str(value))

    def read(self, parameterNode):
        if self.isNode:
            return parameterNode.GetNodeReference(self.name)
        text = parameterNode.GetParameter(self.name)
        return text == "True" if self.type is bool else self.type(text)


def parameterNodeWrapper(classtype):
    """Typed properties over a vtkMRMLScriptedModuleNode; missing parameters get their defaults on wrapping."""
    parameters = {name: _Parameter(name, annotation, classtype.__dict__.get(name, _NO_DEFAULT))
                  for name, annotation in typing.get_type_hints(classtype, include_extras=True).items()}

    def __init__(self, parameterNode) -> None:
        self.parameterNode = parameterNode
        for parameter in parameters.values():
            if not parameterNode.HasParameter(parameter.name):
                parameter.write(parameterNode, parameter.default)

    for name, parameter in parameters.items():
        setattr(classtype, name, property(lambda self, p=parameter: p.read(self.parameterNode),
                                          lambda self, value, p=parameter: p.write(self.parameterNode, value)))
    classtype.__init__ = __init__
    classtype.allParameters = parameters
    return classtype


# --- the application ------------------------------------------------------------------------------------------


def _module(name: str, doc: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__dict__.update(attributes)
    return module


def _isolated(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in ISOLATED_MODULES)


@contextlib.contextmanager
def slicer_application() -> Iterator[types.ModuleType]:
    """Start the application: a fresh ``slicer`` (slicer-core) with its scene, logics and stand-ins; yields it.

    The modules named in ISOLATED_MODULES (e.g. a fake ``slicer`` of other tests) are set aside and restored
    afterwards, and so is sys.path.
    """
    setAside = {name: module for name, module in sys.modules.items() if _isolated(name)}
    for name in setAside:
        del sys.modules[name]
    savedPath = list(sys.path)
    subjectHierarchy = None
    try:
        import slicer

        for name in [n for n in vars(slicer.util) if not n.startswith("_")]:
            if getattr(slicer, name, None) is getattr(slicer.util, name) and name not in vars(slicer.slicer_core):
                delattr(slicer, name)

        scene = slicer.vtkMRMLScene()
        applicationLogic = slicer.vtkSlicerApplicationLogic()
        applicationLogic.SetMRMLScene(scene)
        colorLogic = slicer.vtkMRMLColorLogic()
        colorLogic.SetMRMLApplicationLogic(applicationLogic)
        colorLogic.SetMRMLScene(scene)
        applicationLogic.SetColorLogic(colorLogic)
        applicationLogic.SetModuleLogic("Colors", colorLogic)
        volumesLogic = slicer.vtkSlicerVolumesLogic()
        volumesLogic.SetMRMLApplicationLogic(applicationLogic)
        volumesLogic.SetMRMLScene(scene)
        applicationLogic.SetModuleLogic("Volumes", volumesLogic)
        subjectHierarchyLogic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        subjectHierarchyLogic.SetMRMLApplicationLogic(applicationLogic)
        subjectHierarchyLogic.SetMRMLScene(scene)
        applicationLogic.SetModuleLogic("SubjectHierarchy", subjectHierarchyLogic)
        subjectHierarchy = SubjectHierarchyPluginLogic(scene)

        slicer.mrmlScene = scene
        slicer.app = Application(scene, applicationLogic, volumesLogic)
        stand_ins = {
            "slicer.i18n": _module("slicer.i18n", "Stand-in: no translation.", tr=tr, translate=translate),
            "slicer.ScriptedLoadableModule": _module(
                "slicer.ScriptedLoadableModule", "Stand-in: scripted-module base classes.",
                ScriptedLoadableModule=ScriptedLoadableModule, ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest=ScriptedLoadableModuleTest,
                ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget),
            "slicer.parameterNodeWrapper": _module(
                "slicer.parameterNodeWrapper", "Stand-in: parameter node wrapper.",
                parameterNodeWrapper=parameterNodeWrapper, WithinRange=WithinRange, Choice=Choice),
        }
        for name, module in stand_ins.items():
            sys.modules[name] = module
            setattr(slicer, name.split(".")[1], module)
        sys.modules["qt"] = _module("qt", "Stand-in: no Qt.")
        sys.path[:0] = [str(folder) for folder in MODULE_DIRS]
        yield slicer
    finally:
        if subjectHierarchy is not None:
            subjectHierarchy.close()
        sys.path[:] = savedPath
        for name in [n for n in sys.modules if _isolated(n)]:
            del sys.modules[name]
        sys.modules.update(setAside)


def run_python_script(slicer, monkeypatch, script: Path, *arguments) -> int:
    """Run `script` as `Slicer --python-script SCRIPT ARGUMENTS` does (as __main__, with its own sys.argv); the
    application's exit status."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(script), *map(str, arguments)])
    slicer.app.exitCode = None
    runpy.run_path(str(script), run_name="__main__")
    return slicer.app.exitCode
