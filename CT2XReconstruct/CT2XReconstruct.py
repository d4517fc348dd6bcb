"""CT2XReconstruct ("X-ray to CT"): a PA and a lateral radiograph in, a CT volume out, with an X2CT model.

Module, parameter node, widget, logic and self-test, as in Slicer's scripted-module template. The computation is the
Slicer-free core package ``ct2x`` (imported on first use, never when Slicer starts): films are prepared by
``ct2x.data.films.prepare_film`` and reconstructed by ``ct2x.reconstruct.reconstruct``, whose CT is a cube about RAS
(0, 0, 0) in the model's geometry, with the patient's left of the films on the patient's left (RAS x < 0). The
network runs in a worker thread (``CT2XReconstructLib.background``); nodes are made on the main thread once it has
returned, so a cancelled or failed run leaves nothing behind.
"""

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Callable, List, NamedTuple, Optional, Tuple, Union

import qt
import slicer
import vtk
from CT2XReconstructLib import dependencies
from CT2XReconstructLib.background import BackgroundRun, Cancelled, checked
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# ct2x.data.films' choices and ct2x.reconstruct's precisions and kinds, restated: importing them imports torch, and
# the model list is shown before torch is installed.
INVERT_CHOICES = ["auto", "yes", "no"]
CROP_CHOICES = ["auto", "none"]
FACING_CHOICES = ["auto", "left", "right"]
PRECISIONS = ["fp32", "bf16"]
RECON_KINDS = ["x2ct-biplanar", "x2ct-single", "cvaa-biplanar"]  # ct2x.reconstruct.RECONSTRUCTION_KINDS
POLL_MS = 200  # how often the panel reads a running reconstruction's progress
PREVIEW_DELAY_MS = 300  # changes within this time are merged into one preview
PREVIEW_NAME = "CT2X network input"

FilmSource = Union[str, Path, Any]  # a film file (PNG, JPEG, DICOM) or a single-slice scalar/vector volume node


#
# CT2XReconstruct
#


class CT2XReconstruct(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("X-ray to CT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []  # PyTorchUtils is imported on first use, not when Slicer starts
        self.parent.contributors = ["CT2X team"]
        self.parent.helpText = _(
            "Reconstructs a chest CT from a posterior-anterior (PA) and a lateral radiograph with an X2CT model. "
            "Choose the films (volumes in the scene, or PNG, JPEG or DICOM files), a model (by name, or a model "
            "file), check the preview of what the network will read, and press Reconstruct. The CT appears next to "
            "the films, in HU, in the model's field of view. 'Simulate films' makes a loaded CT's films in the "
            "model's own geometry, to try the round trip CT -> films -> CT. "
            "See <a href='https://github.com/ct2x/SlicerCT2X'>the CT2X documentation</a>.")
        self.parent.acknowledgementText = _(
            "X2CT-GAN: Ying et al., CVPR 2019 (kylekma/X2CT, GPL-3.0 weights, imported into CT2X model files).")


#
# CT2XReconstructParameterNode
#


@parameterNodeWrapper
class CT2XReconstructParameterNode:
    """What the module reconstructs; saved with the scene. A film file, when given, is used instead of the node."""

    paVolume: vtkMRMLScalarVolumeNode
    paFile: str = ""
    lateralVolume: vtkMRMLScalarVolumeNode
    lateralFile: str = ""
    modelName: str = ""  # registry name; its combo box is filled at run time, so it is synchronised by hand
    modelFile: str = ""  # a CT2X model file, used when no registry name is chosen
    invert: Annotated[str, Choice(INVERT_CHOICES)] = "auto"
    crop: Annotated[str, Choice(CROP_CHOICES)] = "auto"
    lateralFacing: Annotated[str, Choice(FACING_CHOICES)] = "auto"
    device: str = "cpu"  # torch device; filled at run time like modelName
    precision: Annotated[str, Choice(PRECISIONS)] = "fp32"
    outputVolume: vtkMRMLScalarVolumeNode
    referenceVolume: vtkMRMLScalarVolumeNode
    makeDifference: bool = False
    volumeRendering: bool = False
    simulateVolume: vtkMRMLScalarVolumeNode


def filmSources(parameterNode: CT2XReconstructParameterNode) -> Tuple[Optional[FilmSource], Optional[FilmSource]]:
    """(PA, lateral): each the file when one is named, else the volume node (or None)."""
    return (parameterNode.paFile.strip() or parameterNode.paVolume,
            parameterNode.lateralFile.strip() or parameterNode.lateralVolume)


def modelSource(parameterNode: CT2XReconstructParameterNode) -> str:
    """The registry name, else the model file."""
    return parameterNode.modelName or parameterNode.modelFile.strip()


def preparation(parameterNode: CT2XReconstructParameterNode) -> dict:
    """The preprocessing keyword arguments of `CT2XReconstructLogic.prepareJob`."""
    return {"invert": parameterNode.invert, "crop": parameterNode.crop, "lateralFacing": parameterNode.lateralFacing}


#
# CT2XReconstructWidget
#


class CT2XReconstructWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Reconstruct starts a BackgroundRun and a timer that shows its progress and ETA every POLL_MS; when
    it is done the output node is made here, on the main thread. Preview: a change of films, model or preprocessing
    restarts a single-shot timer, and the films are prepared again once it fires."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run: Optional[BackgroundRun] = None
        self._job = None
        self._pollTimer = None
        self._previewTimer = None
        self._previewSignature = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CT2XReconstruct.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CT2XReconstructLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)
        self._previewTimer = qt.QTimer()
        self._previewTimer.setSingleShot(True)
        self._previewTimer.setInterval(PREVIEW_DELAY_MS)
        self._previewTimer.connect("timeout()", self.updatePreview)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstructButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.paBrowseButton.connect("clicked(bool)", lambda: self.browseFilm("paFile"))
        self.ui.lateralBrowseButton.connect("clicked(bool)", lambda: self.browseFilm("lateralFile"))
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onModelBrowseButton)
        self.ui.getModelButton.connect("clicked(bool)", self.onGetModelButton)
        self.ui.importOfficialButton.connect("clicked(bool)", self.onImportOfficialButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.simulateButton.connect("clicked(bool)", self.onSimulateButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.deviceComboBox.clear()
        self.ui.deviceComboBox.addItem("CPU", "cpu")  # GPUs are added by populateDevices
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)

        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self.populateLists)  # after the panel is shown: it imports ct2x (and torch)

    def cleanup(self) -> None:
        self._pollTimer.stop()
        self._previewTimer.stop()
        if self._run is not None:
            self._run.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._previewTimer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[CT2XReconstructParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.showComboData(self.ui.modelComboBox, self._parameterNode.modelName)
            self.showComboData(self.ui.deviceComboBox, self._parameterNode.device)
            self.onParameterNodeModified()

    def _previewKey(self) -> tuple:
        """Everything the preview depends on, as shown in the panel."""
        node = self._parameterNode
        films = tuple(film.GetID() if hasattr(film, "GetID") else film for film in filmSources(node))
        return films + (modelSource(node), tuple(sorted(preparation(node).items())))

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        running = self._run is not None
        ready = bool(filmSources(node)[0] and modelSource(node))
        self.ui.reconstructButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running
        self.ui.modelFileLineEdit.enabled = not node.modelName
        self.ui.compareButton.enabled = bool(node.outputVolume and node.referenceVolume) and not running
        self.ui.simulateButton.enabled = bool(node.simulateVolume and modelSource(node)) and not running
        if ready and self._previewKey() != self._previewSignature and dependencies.torch_installed():
            self._previewTimer.start()

    def populateLists(self) -> None:
        """Fill the model combo box (registry names and their state) and the device combo box."""
        with slicer.util.tryWithErrorDisplay(_("Failed to list the models and devices.")):
            self.populateModels()
            self.populateDevices()

    def populateModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Model file (below)"), "")
        for name, label in self.logic.modelChoices():
            combo.addItem(label, name)
        combo.blockSignals(wasBlocked)
        self.showComboData(combo, self._parameterNode.modelName if self._parameterNode else "")

    def populateDevices(self) -> None:
        """The CPU, then each CUDA GPU by name (imports torch if it is installed)."""
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for device, label in self.logic.availableDevices():
            combo.addItem(label, device)
        combo.blockSignals(wasBlocked)
        if self._parameterNode and combo.findData(self._parameterNode.device) < 0:
            self._parameterNode.device = "cpu"  # e.g. a scene saved on a computer with a GPU
        self.showComboData(combo, self._parameterNode.device if self._parameterNode else "cpu")

    @staticmethod
    def showComboData(combo, data: str) -> None:
        index = combo.findData(data)
        if index >= 0:
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(index)
            combo.blockSignals(wasBlocked)

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemData(index) or ""

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "cpu"

    def browseFilm(self, field: str) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Choose a film"), "",
            _("Films (*.png *.jpg *.jpeg *.dcm *.dicom);;All files (*)"))
        if path:
            setattr(self._parameterNode, field, path)

    def onModelBrowseButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Choose a CT2X model file"), "",
                                              _("CT2X model files (*.safetensors)"))
        if path:
            self._parameterNode.modelName = ""
            self.showComboData(self.ui.modelComboBox, "")
            self._parameterNode.modelFile = path

    def _ensureTorch(self) -> None:
        if not dependencies.torch_installed():
            dependencies.ensure_torch()
            self.populateLists()

    def updatePreview(self) -> None:
        """Prepare the films as the network will read them; show them in the Yellow view and the choices below."""
        node = self._parameterNode
        if node is None or self._run is not None:
            return
        self._previewSignature = self._previewKey()
        pa, lateral = filmSources(node)
        try:
            job = self.logic.prepareJob(modelSource(node), pa, lateral, **preparation(node))
            pictureNode = self.logic.updatePreviewNode(job)
        except Exception as error:  # shown in the status line: the user is still choosing
            self.ui.statusLabel.text = _("Preview: {message}").format(message=error)
            return
        self.ui.statusLabel.text = self.logic.describeJob(job)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.sliceWidget("Yellow") is not None:
            sliceLogic = layoutManager.sliceWidget("Yellow").sliceLogic()
            sliceLogic.GetSliceCompositeNode().SetBackgroundVolumeID(pictureNode.GetID())
            sliceLogic.GetSliceNode().SetOrientationToAxial()  # a loaded 2-D picture's own plane
            sliceLogic.FitSliceToAll()

    def onReconstructButton(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the reconstruction."), waitCursor=True):
            self._ensureTorch()
            pa, lateral = filmSources(node)
            self._job = self.logic.prepareJob(modelSource(node), pa, lateral, **preparation(node))
            device, precision = node.device, node.precision
            self._run = BackgroundRun(lambda progress: self.logic.computeVolume(self._job, device, precision,
                                                                                progress)).start()
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Reconstructing on {device}...").format(device=device)
            self._pollTimer.start()
            self.onParameterNodeModified()

    def onCancelButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def onPoll(self) -> None:
        """Show the running reconstruction's progress; once it is done, make the output node or report why not."""
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        self.ui.progressBar.setValue(int(round(100 * run.fraction)))
        if not run.done:
            eta = run.eta_s()
            if not run.cancelling:
                self.ui.statusLabel.text = _("Reconstructing: {percent:.0f} %, {left}").format(
                    percent=100 * run.fraction,
                    left=_("about {seconds:.0f} s left").format(seconds=eta) if eta is not None else _("starting"))
            return
        self._pollTimer.stop()
        self._run = None
        try:
            volume = run.result()
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled: no volume was made.")
            self.ui.progressBar.setValue(0)
        except Exception as error:
            logging.exception("CT2XReconstruct: the reconstruction failed")
            self.ui.statusLabel.text = _("Failed: {message}").format(message=error)
            slicer.util.errorDisplay(_("The reconstruction failed: {message}").format(message=error))
        else:
            with slicer.util.tryWithErrorDisplay(_("Failed to show the reconstruction."), waitCursor=True):
                node = self._parameterNode
                outputNode = self.logic.addOutputNode(self._job, volume, node.outputVolume, showResult=True,
                                                      volumeRendering=node.volumeRendering)
                node.outputVolume = outputNode
                self.ui.statusLabel.text = self.logic.lastStatus + "\n" + _("{seconds:.1f} s").format(
                    seconds=run.elapsed_s())
                if node.referenceVolume:
                    self.onCompareButton()
        self.onParameterNodeModified()

    def onGetModelButton(self) -> None:
        """Download the chosen registry model (verified, cached), or say how to get weights fetched by hand."""
        name = self._parameterNode.modelName
        if not name:
            slicer.util.infoDisplay(_("Choose a model by name first."))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to get the model."), waitCursor=True):
            self._ensureTorch()
            instructions = self.logic.howToGetModel(name)
            if instructions:
                slicer.util.infoDisplay(instructions, windowTitle=_("Get {name}").format(name=name))
                return
            if not slicer.util.confirmOkCancelDisplay(self.logic.downloadQuestion(name)):
                return
            run = BackgroundRun(lambda progress: self.logic.downloadModel(name, progress)).start()
            while not run.wait(0.1):  # keep the GUI responsive meanwhile
                self.ui.progressBar.setValue(int(round(100 * run.fraction)))
                self.ui.statusLabel.text = _("Downloading {name}: {percent:.0f} %").format(
                    name=name, percent=100 * run.fraction)
                slicer.app.processEvents()
            run.result()
            self.ui.progressBar.setValue(0)
            self.populateModels()
            self.ui.statusLabel.text = _("{name} downloaded and verified.").format(name=name)

    def onImportOfficialButton(self) -> None:
        """Turn an official X2CT-GAN checkpoint (.pth) into the chosen registry model's file in the cache."""
        name = self._parameterNode.modelName
        if not name:
            slicer.util.infoDisplay(_("Choose x2ct-gan-biplanar or x2ct-gan-single above first."))
            return
        checkpoint = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Official X2CT-GAN checkpoint"), "",
                                                    _("PyTorch checkpoints (*.pth)"))
        if not checkpoint:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the checkpoint."), waitCursor=True):
            self._ensureTorch()
            path = self.logic.importOfficialModel(checkpoint, name)
            self.populateModels()
            self.ui.statusLabel.text = _("Imported into {path}").format(path=path)

    def onCompareButton(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to compare with the reference CT."), waitCursor=True):
            tableNode, _differenceNode = self.logic.compareToReference(node.outputVolume, node.referenceVolume,
                                                                       makeDifference=node.makeDifference)
            self.ui.metricsTableView.setMRMLTableNode(tableNode)

    def onSimulateButton(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to simulate the films."), waitCursor=True):
            self._ensureTorch()
            films = self.logic.simulateFilms(node.simulateVolume, modelSource(node))
            node.paFile, node.lateralFile = "", ""
            node.paVolume = films[0]
            if len(films) > 1:
                node.lateralVolume = films[1]
            self.ui.statusLabel.text = _("Films of {ct} in the model's geometry: {films}").format(
                ct=node.simulateVolume.GetName(), films=", ".join(film.GetName() for film in films))


#
# CT2XReconstructLogic
#


class ReconstructionJob(NamedTuple):
    """Everything a reconstruction needs, gathered on the main thread: the model, the films as the network reads
    them, and where they came from."""

    model: str  # as given: registry name or file
    modelFile: Path
    info: Any  # ct2x.models.ModelInfo
    films: List[Any]  # ct2x.data.films.PreparedFilm, in the model's view order (PA, lateral)
    filmNames: List[str]
    filmNodeID: Optional[str]  # the PA film's node, beside which the CT goes in the subject hierarchy


class CT2XReconstructLogic(ScriptedLoadableModuleLogic):
    """Reconstructs CT volume nodes from film nodes or files; usable without the GUI (Python console, batch).

    `reconstruct` blocks; the panel calls its three steps itself, `prepareJob` (main thread), `computeVolume` (worker
    thread, no MRML) and `addOutputNode` (main thread). The last loaded network is kept for the next run.
    """

    VIEW_LABELS = {"pa": "PA", "lateral": "lateral"}

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._loaded = None
        self._loadedKey = None
        self.lastStatus = ""
        self.notices: List[str] = []  # what happened on the way, e.g. the GPU ran out of memory

    def getParameterNode(self):
        return CT2XReconstructParameterNode(super().getParameterNode())

    @staticmethod
    def availableDevices() -> List[Tuple[str, str]]:
        """(torch device, label) pairs: the CPU, then each CUDA GPU by name; imports torch only if installed."""
        if not dependencies.torch_installed():
            return [("cpu", "CPU")]
        dependencies.add_core_to_path()
        from ct2x.device import available_devices

        return available_devices()

    # --- models ------------------------------------------------------------------------------------------------

    @staticmethod
    def modelChoices() -> List[Tuple[str, str]]:
        """(registry name, label) of the films -> CT models ct2x knows: kind, licence, size, whether in the cache."""
        dependencies.add_core_to_path()
        from ct2x.models import cache_state, load_registry
        from ct2x.text import size_text

        choices = []
        for name, entry in load_registry().items():
            if entry.kind not in RECON_KINDS:
                continue
            size = f", {size_text(entry.size_bytes)}" if entry.size_bytes else ""
            state = {"verified": "downloaded", "unverified": "downloaded", "imported": "imported",
                     "absent": "to download" if entry.manual is None else "to import by hand"}[cache_state(entry)]
            choices.append((name, f"{name} ({entry.kind}, {entry.license}{size}, {state})"))
        return choices

    @staticmethod
    def howToGetModel(name: str) -> str:
        """"" when ct2x can download the model itself or it is in the cache; else the instructions to fetch it."""
        dependencies.add_core_to_path()
        from ct2x.errors import CT2XInputError
        from ct2x.models import cache_state, cached_path, find_model

        entry = find_model(name)
        if entry.manual is None or cache_state(entry) == "imported":
            return ""
        try:
            cached_path(entry)
        except CT2XInputError as error:
            return str(error)
        return ""

    @staticmethod
    def downloadQuestion(name: str) -> str:
        dependencies.add_core_to_path()
        from ct2x.models import cache_path, find_model
        from ct2x.text import size_text

        entry = find_model(name)
        return (f"Download {name} ({size_text(entry.size_bytes)}, {entry.license}) from {entry.url} into "
                f"{cache_path(entry)}? Its SHA256 is checked before first use.")

    @staticmethod
    def downloadModel(name: str, progress: Optional[Callable[[float], None]] = None) -> Path:
        """The registry model's file, downloaded into the cache (SHA256 verified) unless it is there already;
        `progress` is called with the fraction downloaded."""
        dependencies.add_core_to_path()
        from ct2x.models import download

        return download(name, progress=progress or False)

    @staticmethod
    def importOfficialModel(checkpoint: Union[str, Path], name: str, out: Optional[Union[str, Path]] = None) -> Path:
        """Import an official X2CT-GAN generator checkpoint (.pth) as the registry model `name`'s file (into the
        cache unless `out` is given); the variant (biplanar or single) is the registry entry's."""
        dependencies.add_core_to_path()
        from ct2x.errors import CT2XInputError
        from ct2x.models import cache_path, find_model
        from ct2x.models.x2ct_official import import_official_checkpoint

        entry = find_model(name)
        variants = {"x2ct-biplanar": "biplanar", "x2ct-single": "single"}
        if entry.kind not in variants:
            raise CT2XInputError(f"{name} is a {entry.kind} model, not an official X2CT-GAN generator")
        target = Path(out) if out is not None else cache_path(entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        return import_official_checkpoint(checkpoint, variants[entry.kind], target)

    def loadedModel(self, modelFile: Path, device: str):
        """The network of a model file on a device, loaded once and kept until another is asked for."""
        from ct2x.reconstruct import load_recon_model

        key = (str(modelFile), modelFile.stat().st_mtime_ns, device)
        if key != self._loadedKey:
            self._loaded, self._loadedKey = None, None  # free the previous network first
            self._loaded = load_recon_model(modelFile, device)
            self._loadedKey = key
        return self._loaded

    # --- films -------------------------------------------------------------------------------------------------

    def prepareJob(self, model: str, pa: FilmSource, lateral: Optional[FilmSource] = None, invert: str = "auto",
                   crop: str = "auto", lateralFacing: str = "auto") -> ReconstructionJob:
        """Read the model's header and prepare the films as the network will read them (main thread: reads nodes).

        :param model: registry name or CT2X model file of an x2ct-* kind.
        :param pa: PA film: a file (PNG, JPEG, DICOM) or a single-slice scalar (grey) or vector (RGB/RGBA) volume
            node; a film this module simulated for the model is used as it is.
        :param lateral: lateral film, likewise (biplanar models only).
        :param invert, crop, lateralFacing: as `ct2x reconstruct`'s --invert, --crop, --lateral-facing.
        :raises CT2XInputError: with a message for the user (missing film, wrong model kind, unreadable film...).
        """
        dependencies.add_core_to_path()
        from ct2x.errors import CT2XInputError
        from ct2x.reconstruct import check_views, film_size, recon_model_file

        if not model:
            raise CT2XInputError("choose a model: a name from the list or a CT2X model file")
        if pa is None or pa == "":
            raise CT2XInputError("choose the PA film: a volume in the scene or a file")
        modelFile, info = recon_model_file(model)
        views = check_views(info, lateral is not None and lateral != "")
        size = film_size(info)
        films, names = [], []
        for view, source in zip(views, (pa, lateral)):
            films.append(self._preparedFilm(source, view, size, invert, crop, lateralFacing))
            names.append(source.GetName() if hasattr(source, "GetName") else str(source))
        filmNodeID = pa.GetID() if hasattr(pa, "GetID") else None
        return ReconstructionJob(str(model), modelFile, info, films, names, filmNodeID)

    def _preparedFilm(self, source: FilmSource, view: str, size: int, invert: str, crop: str, facing: str):
        from CT2XReconstructLib import mrml_nodes
        from CT2XSynthLib.mrml_geometry import film_array

        from ct2x.data.films import PreparedFilm, prepare_film
        from ct2x.errors import CT2XInputError

        label = self.VIEW_LABELS[view]
        if not hasattr(source, "GetName"):
            return prepare_film(source, view, size, invert=invert, crop=crop,
                                facing=facing if view == "lateral" else "auto")
        pixels = film_array(source)  # (H, W) or (H, W, C), as displayed
        if source.GetAttribute(mrml_nodes.FILM_VIEW_ATTRIBUTE) == view and pixels.shape == (size, size):
            return PreparedFilm(pixels.astype("float32"), (
                f"{source.GetName()}: the model's own {label} film (simulated from a CT), used as it is",))
        try:
            film = prepare_film(pixels, view, size, invert=invert, crop=crop,
                                facing=facing if view == "lateral" else "auto")
        except CT2XInputError as error:
            raise CT2XInputError(f"{label} film {source.GetName()}: {error}") from None
        return PreparedFilm(film.image, (f"read volume {source.GetName()}",) + film.choices[1:])

    def describeJob(self, job: ReconstructionJob) -> str:
        """The model and every preprocessing decision, one line each."""
        from ct2x.reconstruct import film_views

        lines = [f"Model: {job.modelFile.name} ({job.info.kind})"]
        for view, film in zip(film_views(job.info), job.films):
            lines += [f"{self.VIEW_LABELS[view]}: {choice}" for choice in film.choices]
        return "\n".join(lines)

    def updatePreviewNode(self, job: ReconstructionJob):
        """The films exactly as the network reads them, side by side (PA first), in the node PREVIEW_NAME."""
        from CT2XReconstructLib import mrml_nodes

        from ct2x.reconstruct import network_input_picture

        pictureNode = slicer.mrmlScene.GetFirstNodeByName(PREVIEW_NAME)
        if pictureNode is None:
            pictureNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", PREVIEW_NAME)
        mrml_nodes.update_picture_node(pictureNode, network_input_picture(job.films))  # (P, 2P + 2) uint8
        return pictureNode

    # --- the reconstruction ------------------------------------------------------------------------------------

    def computeVolume(self, job: ReconstructionJob, device: str = "cpu", precision: str = "fp32",
                      progress: Optional[Callable[[float], None]] = None):
        """The engine's CTVolume for a prepared job; touches no MRML, so it may run in a worker thread.

        On CUDA out-of-memory the run is repeated on the CPU, with a notice. An exception raised by `progress`
        (e.g. Cancelled) stops the run and propagates.
        """
        import torch

        from ct2x.reconstruct import reconstruct

        self.notices = []
        try:
            model = self.loadedModel(job.modelFile, device)
            return reconstruct(model, *job.films, device=device, precision=precision, progress=progress)
        except torch.cuda.OutOfMemoryError:
            self._loaded, self._loadedKey = None, None
            torch.cuda.empty_cache()
            self.notices.append(f"the GPU ({device}) ran out of memory: reconstructed on the CPU instead")
            logging.warning(f"CT2XReconstruct: {self.notices[-1]}")
            if progress is not None:
                progress(0.0)
            model = self.loadedModel(job.modelFile, "cpu")
            return reconstruct(model, *job.films, device="cpu", precision=precision, progress=progress)

    def addOutputNode(self, job: ReconstructionJob, volume, outputNode=None, showResult: bool = True,
                      volumeRendering: bool = False):
        """Put the reconstruction into `outputNode` (a new node when None) next to the PA film, with its attributes
        and a CT window; returns the node. Main thread."""
        dependencies.add_core_to_path()
        from CT2XReconstructLib import mrml_nodes
        from CT2XSynthLib import mrml_geometry

        import ct2x
        from ct2x.reconstruct import describe_geometry, film_views

        if outputNode is None:
            base = Path(job.filmNames[0]).stem if job.filmNodeID is None else job.filmNames[0]
            name = slicer.mrmlScene.GenerateUniqueName(f"{base} CT ({job.info.kind})")
            outputNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            filmNode = slicer.mrmlScene.GetNodeByID(job.filmNodeID) if job.filmNodeID else None
            if filmNode is not None:
                mrml_geometry.place_next_to(outputNode, filmNode)
        mrml_nodes.update_ct_node(outputNode, volume)
        for name in [name for name in outputNode.GetAttributeNames() or () if name.startswith("CT2X.")]:
            outputNode.RemoveAttribute(name)  # a node filled again keeps nothing of its previous reconstruction
        views = film_views(job.info)
        attributes = {
            "CT2X.kind": "reconstruction",
            "CT2X.model": job.model,
            "CT2X.modelFile": str(job.modelFile),
            "CT2X.modelKind": job.info.kind,
            "CT2X.modelCreatedBy": job.info.created_by,
            "CT2X.modelLicense": job.info.license,
            "CT2X.modelSource": json.dumps(job.info.source, sort_keys=True),  # e.g. the official checkpoint, SHA256
            "CT2X.version": ct2x.__version__,
            "CT2X.geometry": describe_geometry(job.info, volume.hu.shape[0]),
        }
        for view, film, name in zip(views, job.films, job.filmNames):
            attributes[f"CT2X.{view}Film"] = name
            attributes[f"CT2X.{view}Preprocessing"] = "\n".join(film.choices)
        for key, value in attributes.items():
            outputNode.SetAttribute(key, value)
        mrml_nodes.show_ct_window(outputNode)
        self.lastStatus = "\n".join([self.describeJob(job), f"CT in '{outputNode.GetName()}': "
                                     f"{attributes['CT2X.geometry']}"] + [f"Note: {n}" for n in self.notices])
        logging.info(f"CT2XReconstruct: {self.lastStatus}")
        if showResult:
            mrml_nodes.show_volume(outputNode)
        if volumeRendering:
            mrml_nodes.show_volume_rendering(outputNode)
        return outputNode

    def reconstruct(self, model: str, pa: FilmSource, lateral: Optional[FilmSource] = None, invert: str = "auto",
                    crop: str = "auto", lateralFacing: str = "auto", device: str = "cpu", precision: str = "fp32",
                    outputNode=None, progress: Optional[Callable[[float], None]] = None,
                    cancel: Optional[threading.Event] = None, showResult: bool = True, volumeRendering: bool = False):
        """Reconstruct a CT volume node from a PA (and lateral) film; blocks until done.

        :param model, pa, lateral, invert, crop, lateralFacing: as `prepareJob`.
        :param device: torch device, "cpu" or "cuda:N" (CUDA out of memory: repeated on the CPU, see `notices`).
        :param precision: "fp32" or "bf16".
        :param outputNode: scalar volume node to fill; None makes a new one beside the PA film node.
        :param progress: called with the fraction (0..1) of the network's work done, from the computing thread.
        :param cancel: when set during the run, the run stops with `Cancelled` and no node is made or changed.
        :return: the output node: float32 HU, the model's cube (voxel ijk -> RAS mm) about RAS (0, 0, 0).
        """
        dependencies.ensure_torch()
        job = self.prepareJob(model, pa, lateral, invert, crop, lateralFacing)
        start = time.perf_counter()
        volume = self.computeVolume(job, device, precision, checked(progress, cancel))
        outputNode = self.addOutputNode(job, volume, outputNode, showResult, volumeRendering)
        logging.info(f"CT2XReconstruct: reconstructed in {time.perf_counter() - start:.1f} s")
        return outputNode

    # --- reference CT and simulated films ----------------------------------------------------------------------

    def compareToReference(self, outputNode, referenceNode, makeDifference: bool = False):
        """The metrics of `ct2x evaluate recon` of a reconstruction against a real CT, in a table node, and, when
        asked, the difference volume (reconstruction - reference, HU, on the reconstruction's grid).

        :return: (table node "<output> metrics", difference node or None), both next to the output node.
        """
        dependencies.ensure_torch()
        from CT2XReconstructLib import mrml_nodes
        from CT2XSynthLib import mrml_geometry

        from ct2x.errors import CT2XInputError
        from ct2x.reconstruct import compare_to_reference
        from ct2x.volume import CTVolume

        if outputNode is None or referenceNode is None:
            raise CT2XInputError("choose the reconstruction and the reference CT")
        reconstruction = mrml_nodes.ct_volume_from_node(outputNode, storedValues="hu")
        comparison = compare_to_reference(reconstruction, mrml_nodes.ct_volume_from_node(referenceNode))
        tableName = f"{outputNode.GetName()} metrics"
        tableNode = slicer.mrmlScene.GetFirstNodeByName(tableName)
        if tableNode is None or not tableNode.IsA("vtkMRMLTableNode"):
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", tableName)
            mrml_geometry.place_next_to(tableNode, outputNode)
        mrml_nodes.update_metrics_table(tableNode, comparison.metrics)
        tableNode.SetAttribute("CT2X.reference", referenceNode.GetName())
        differenceNode = None
        if makeDifference:
            differenceNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(
                    f"{outputNode.GetName()} - {referenceNode.GetName()}"))
            mrml_geometry.place_next_to(differenceNode, outputNode)
            mrml_nodes.update_ct_node(differenceNode, CTVolume(hu=comparison.difference_hu,
                                                               affine=reconstruction.affine, source="difference"))
            differenceNode.CreateDefaultDisplayNodes()
            differenceNode.GetDisplayNode().AutoWindowLevelOff()
            differenceNode.GetDisplayNode().SetWindowLevel(1000.0, 0.0)  # -500 ... +500 HU
        self.lastStatus = ", ".join(f"{name} {value:.4g}" for name, value in comparison.metrics.items())
        return tableNode, differenceNode

    def simulateFilms(self, ctNode, model: str) -> list:
        """The films `model` reads (PA, then lateral for biplanar models) of a loaded CT, in the model's own film
        geometry, as new film nodes next to the CT; `reconstruct` uses them as they are.

        The films are laid out as a loaded 2-D picture (see `mrml_nodes.update_picture_node`), pixels of the model's
        cube edge / film size in mm; float32 in [0, 1], bone bright.
        """
        dependencies.ensure_torch()
        from CT2XReconstructLib import mrml_nodes
        from CT2XSynthLib import mrml_geometry

        from ct2x.reconstruct import cube_mm, film_views, recon_model_file, simulate_films

        _modelFile, info = recon_model_file(model)
        films = simulate_films(mrml_nodes.ct_volume_from_node(ctNode), info)
        edgeMm, _source = cube_mm(info)
        nodes = []
        for view, film in zip(film_views(info), films):
            name = slicer.mrmlScene.GenerateUniqueName(f"{ctNode.GetName()} {self.VIEW_LABELS[view]} film")
            filmNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            mrml_nodes.update_picture_node(filmNode, film.image, pixelMm=edgeMm / film.image.shape[1])
            filmNode.SetAttribute(mrml_nodes.FILM_VIEW_ATTRIBUTE, view)
            filmNode.SetAttribute("CT2X.filmSource", "\n".join(film.choices))
            mrml_geometry.place_next_to(filmNode, ctNode)
            nodes.append(filmNode)
        return nodes


#
# CT2XReconstructTest
#


class CT2XReconstructTest(ScriptedLoadableModuleTest):
    """The round trip CT -> films -> CT through the logic with a small untrained X2CT network made here (CPU,
    seconds, no downloads): geometry, attributes and placement of the output, and a cancelled run leaving nothing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_round_trip()
        self.setUp()
        self.test_cancel_leaves_no_node()

    def _tinyModel(self, folder: str) -> str:
        """A randomly initialised biplanar X2CT-GAN (the unit-test preset: 64^2 films -> 64^3 voxels, here over a
        160 mm cube) saved in `folder`; its output is no CT of anything: geometry and plumbing are what is tested."""
        dependencies.ensure_torch()
        dependencies.add_core_to_path()
        import torch

        from ct2x.models import ModelInfo, save_model
        from ct2x.nets.x2ct import PRESETS, X2CTGenerator

        torch.manual_seed(0)
        path = Path(folder) / "tiny-x2ct.safetensors"
        save_model(path, X2CTGenerator(PRESETS["tiny64"]), ModelInfo(
            kind="x2ct-biplanar", config=PRESETS["tiny64"].to_dict(), license="Apache-2.0",
            inputs={"films": ["pa", "lateral"], "film_px": 64},
            outputs={"volume": "(N, 1, D, H, W), X2CT normalisation", "voxels": 64, "field_of_view_mm": 160.0}))
        return str(path)

    def _chestNode(self):
        dependencies.add_core_to_path()
        from ct2x.phantoms import chest
        from ct2x.vtk_bridge import vtk_from_array, vtk_matrix_from_array

        volume = chest(size=48)  # 48^3 voxels of 2.5 mm, HU
        ctNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chest phantom")
        ctNode.SetAndObserveImageData(vtk_from_array(volume.hu))
        ctNode.SetIJKToRASMatrix(vtk_matrix_from_array(volume.affine))
        ctNode.CreateDefaultDisplayNodes()
        return ctNode

    def test_round_trip(self):
        self.delayDisplay("Simulating the films of a chest phantom and reconstructing them")
        logic = CT2XReconstructLogic()
        with tempfile.TemporaryDirectory() as folder:
            model = self._tinyModel(folder)
            pa, lateral = logic.simulateFilms(self._chestNode(), model)
            fractions = []
            ctNode = logic.reconstruct(model, pa, lateral, progress=fractions.append)
        self.assertEqual(ctNode.GetImageData().GetDimensions(), (64, 64, 64))
        for axis in range(3):
            self.assertAlmostEqual(ctNode.GetSpacing()[axis], 2.5, places=5)  # 160 mm / 64 voxels
        ijkToRas = vtk.vtkMatrix4x4()
        ctNode.GetIJKToRASMatrix(ijkToRas)
        center = ijkToRas.MultiplyPoint([31.5, 31.5, 31.5, 1.0])
        for axis in range(3):
            self.assertAlmostEqual(center[axis], 0.0, places=3)  # the cube is centred on RAS (0, 0, 0)
        self.assertEqual(ctNode.GetAttribute("CT2X.modelKind"), "x2ct-biplanar")
        self.assertEqual(ctNode.GetAttribute("CT2X.lateralFilm"), lateral.GetName())
        self.assertGreater(len(fractions), 1)
        self.assertAlmostEqual(fractions[-1], 1.0, places=6)
        self.delayDisplay("Test passed")

    def test_cancel_leaves_no_node(self):
        self.delayDisplay("Cancelling a reconstruction on its way")
        logic = CT2XReconstructLogic()
        cancel = threading.Event()

        def cancelOnTheWay(fraction: float) -> None:
            if fraction > 0.0:  # the first report: the network is on its way
                cancel.set()

        with tempfile.TemporaryDirectory() as folder:
            model = self._tinyModel(folder)
            pa, lateral = logic.simulateFilms(self._chestNode(), model)
            volumes = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
            with self.assertRaises(Cancelled):
                logic.reconstruct(model, pa, lateral, progress=cancelOnTheWay, cancel=cancel)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), volumes)
        self.delayDisplay("Test passed")
