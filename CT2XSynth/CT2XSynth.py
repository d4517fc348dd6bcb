"""CT2XSynth ("CT to X-ray"): load a CT, drag the C-arm view angle, see its radiograph follow.

Module, parameter node, widget, logic and self-test, as in Slicer's scripted-module template. The computation is the
Slicer-free core package ``ct2x`` (imported on first use, never when Slicer starts); the conversion between volume
nodes and ct2x arrays is ``ct2x.vtk_bridge``; the few MRML calls are in ``CT2XSynthLib.mrml_geometry``.
Angles in degrees, lengths in mm, positions in patient RAS (see ``ct2x.geometry`` for the C-arm convention).
"""

import logging
import time
import warnings
from typing import Annotated, List, Optional, Sequence, Tuple, Union

import qt
import slicer
import vtk
from CT2XSynthLib import dependencies
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PHYSICS_ENGINE = "Physics DRR"
GAN_ENGINE = "CT2X-GAN"
ENGINES = [PHYSICS_ENGINE, GAN_ENGINE]
SPECTRA = ["60kV", "90kV", "120kV"]  # ct2x.physics.SPECTRA, restated: importing ct2x.physics imports torch
# The paper's mobile C-arm, restated from ct2x.geometry (imported on first render, not when Slicer starts).
SOURCE_TO_DETECTOR_MM = 1020.0
SOURCE_TO_ISOCENTER_MM = 530.0
DETECTOR_SIZE_PX = 256
LIVE_UPDATE_DELAY_MS = 100  # live update: changes within this time are merged into one render


#
# CT2XSynth
#


class CT2XSynth(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT to X-ray")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []  # PyTorchUtils is imported on first render, not when Slicer starts
        self.parent.contributors = ["CT2X team"]
        self.parent.helpText = _(
            "Synthesises X-ray images (radiographs) of a CT at any C-arm angle. Select a CT, drag the horizontal "
            "angle (0 = AP, +90 = left lateral) and the X-ray follows: physically based (Physics DRR), or learned "
            "in the look of a reference X-ray (CT2X-GAN: a model file and a style X-ray). The output is a "
            "single-slice volume with the "
            "detector's pixel spacing, shown in the Red slice view and on its detector plane in the 3-D view. "
            "'Generate series' renders one X-ray per angle into a folder next to the CT. "
            "See <a href='https://github.com/ct2x/SlicerCT2X'>the CT2X documentation</a>.")
        self.parent.acknowledgementText = _(
            "Physically based DRR: polychromatic Beer-Lambert through air, soft tissue and bone, with tube spectra and "
            "attenuation tables generated with SpekPy and xraylib. Geometry defaults follow the CT2X-GAN paper's "
            "mobile C-arm. CT2X-GAN: Tan et al., arXiv 2404.11889, implemented from the paper by CT2X.")


#
# CT2XSynthParameterNode
#


@parameterNodeWrapper
class CT2XSynthParameterNode:
    """What the module renders; saved with the scene. Angles in degrees, lengths in mm."""

    inputVolume: vtkMRMLScalarVolumeNode
    engine: Annotated[str, Choice(ENGINES)] = PHYSICS_ENGINE
    primaryAngleDeg: Annotated[float, WithinRange(-90.0, 90.0)] = 0.0  # 0 = AP, +90 = left lateral
    secondaryAngleDeg: Annotated[float, WithinRange(-45.0, 45.0)] = 0.0  # cranial +, caudal -
    liveUpdate: bool = True
    seriesAngles: str = "-90:90:30"  # START:STOP:STEP, a,b,c or one angle
    spectrum: Annotated[str, Choice(SPECTRA)] = "60kV"
    noisePhotons: Annotated[int, WithinRange(0, 10_000_000)] = 0  # photons per pixel; 0 = noiseless
    sourceToDetectorMm: Annotated[float, WithinRange(100.0, 3000.0)] = SOURCE_TO_DETECTOR_MM
    sourceToIsocenterMm: Annotated[float, WithinRange(50.0, 2900.0)] = SOURCE_TO_ISOCENTER_MM
    detectorSizePx: Annotated[int, WithinRange(16, 2048)] = DETECTOR_SIZE_PX
    pixelSpacingMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0  # 0 = fit the body in view
    device: str = "cpu"  # torch device; its combo box is filled at run time, so it is synchronised by hand
    ganModel: str = ""  # CT2X-GAN engine: a model file of kind ct2x-gan (or its registry name)
    styleVolume: vtkMRMLScalarVolumeNode  # CT2X-GAN engine: the style X-ray, a loaded 2-D picture ...
    styleFile: str = ""  # ... or a file (PNG, JPEG, DICOM), used instead when given
    outputVolume: vtkMRMLScalarVolumeNode


def renderSettings(parameterNode: CT2XSynthParameterNode) -> dict:
    """The keyword arguments of `CT2XSynthLogic.process` other than nodes and angles."""
    return {
        "engine": parameterNode.engine,
        "spectrum": parameterNode.spectrum,
        "noisePhotons": parameterNode.noisePhotons,
        "sourceToDetectorMm": parameterNode.sourceToDetectorMm,
        "sourceToIsocenterMm": parameterNode.sourceToIsocenterMm,
        "detectorSizePx": parameterNode.detectorSizePx,
        "pixelSpacingMm": parameterNode.pixelSpacingMm,
        "device": parameterNode.device,
        "ganModel": parameterNode.ganModel.strip(),
        "style": parameterNode.styleFile.strip() or parameterNode.styleVolume,
    }


#
# CT2XSynthWidget
#


class CT2XSynthWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Live update: a change starts a single-shot timer unless it is already running, so all changes
    within LIVE_UPDATE_DELAY_MS merge into one render of the latest settings (while dragging, the film follows about
    every 100 ms plus the render time). A change during a render only marks that one more render is needed, so
    frames never queue up and a stale angle is never drawn."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._liveTimer = None
        self._rendering = False
        self._renderAgain = False
        self._renderedSignature = None  # what the film shows; live mode renders when the panel differs from it

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CT2XSynth.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CT2XSynthLogic()

        self._liveTimer = qt.QTimer()
        self._liveTimer.setSingleShot(True)
        self._liveTimer.setInterval(LIVE_UPDATE_DELAY_MS)
        self._liveTimer.connect("timeout()", self.onLiveTimeout)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.generateSeriesButton.connect("clicked(bool)", self.onGenerateSeriesButton)
        self.ui.ganModelBrowseButton.connect("clicked(bool)", self.onGanModelBrowseButton)
        self.ui.styleBrowseButton.connect("clicked(bool)", self.onStyleBrowseButton)
        self.ui.deviceComboBox.clear()
        self.ui.deviceComboBox.addItem("CPU", "cpu")  # GPUs are added by populateDevices
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)

        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self.populateDevices)  # after the panel is shown: it may import torch

    def cleanup(self) -> None:
        self._liveTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._liveTimer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._liveTimer.stop()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                parameterNode.inputVolume = firstVolumeNode
        self.setParameterNode(parameterNode)

    def setParameterNode(self, inputParameterNode: Optional[CT2XSynthParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self._renderedSignature = self._signature()  # entering the module does not render by itself
            self.showDevice()
            self.onParameterNodeModified()

    def _signature(self) -> tuple:
        """Everything the film depends on, as shown in the panel."""
        node = self._parameterNode
        return (node.inputVolume.GetID() if node.inputVolume else None,
                node.outputVolume.GetID() if node.outputVolume else None,
                node.primaryAngleDeg, node.secondaryAngleDeg, node.liveUpdate,
                tuple(sorted(renderSettings(node).items())))

    def _canRender(self) -> bool:
        node = self._parameterNode
        return bool(node and node.inputVolume and (node.engine == PHYSICS_ENGINE or node.ganModel.strip()))

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Enable what can run; in live mode, restart the debounce timer when the panel differs from the film."""
        canRender = self._canRender()
        self.ui.applyButton.enabled = canRender
        self.ui.generateSeriesButton.enabled = canRender
        gan = bool(self._parameterNode and self._parameterNode.engine == GAN_ENGINE)
        self.ui.ganCollapsibleButton.collapsed = not gan
        self.ui.physicsCollapsibleButton.enabled = not gan  # the model fixes the physics and the geometry
        if gan and not self._parameterNode.ganModel.strip():
            self.ui.statusLabel.text = _("CT2X-GAN: choose a model file and a style X-ray.")
        if (canRender and self._parameterNode.liveUpdate and dependencies.torch_installed()
                and self._signature() != self._renderedSignature and not self._liveTimer.isActive()):
            self._liveTimer.start()

    def onLiveTimeout(self) -> None:
        """Render the panel's current settings; if a render is running, render once more after it."""
        if self._rendering:
            self._renderAgain = True
            return
        if not self._canRender() or self._signature() == self._renderedSignature:
            return
        self._rendering = True
        try:
            self.renderFilm()
        except Exception as error:  # live mode: report in the status line, no dialog per frame
            logging.exception("CT2XSynth live update failed")
            self.ui.statusLabel.text = _("Error: {message}").format(message=error)
            self._renderedSignature = self._signature()  # do not retry the same failing settings
        finally:
            self._rendering = False
        if self._renderAgain:
            self._renderAgain = False
            self._liveTimer.start()

    def renderFilm(self) -> None:
        """Render the film at the panel's angles into the output node (created when none is selected)."""
        node = self._parameterNode
        self.ui.statusLabel.text = _("Rendering...")
        self.ui.statusLabel.repaint()
        if not node.outputVolume:
            node.outputVolume = self.logic.newFilmNode(node.inputVolume, _("X-ray"))  # next to the CT
        self.logic.process(node.inputVolume, node.outputVolume, node.primaryAngleDeg, node.secondaryAngleDeg,
                           **renderSettings(node))
        self._renderedSignature = self._signature()
        self.ui.statusLabel.text = self.logic.lastStatus

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to render the X-ray."), waitCursor=True):
            self._ensureTorch()
            self.renderFilm()

    def onGenerateSeriesButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to render the X-ray series."), waitCursor=True):
            self._ensureTorch()
            node = self._parameterNode
            start = time.perf_counter()
            films = self.logic.processSeries(node.inputVolume, node.seriesAngles, node.secondaryAngleDeg,
                                             **renderSettings(node))
            self.ui.statusLabel.text = _("{count} X-rays in folder '{folder}' ({seconds:.1f} s)").format(
                count=len(films), folder=self.logic.lastSeriesFolderName, seconds=time.perf_counter() - start)

    def onGanModelBrowseButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Choose a CT2X-GAN model file"), "",
                                              _("CT2X model files (*.safetensors)"))
        if path:
            self._parameterNode.ganModel = path

    def onStyleBrowseButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Choose a style X-ray"), "",
                                              _("X-rays (*.png *.jpg *.jpeg *.dcm *.dicom);;All files (*)"))
        if path:
            self._parameterNode.styleFile = path

    def _ensureTorch(self) -> None:
        """On first use: install PyTorch through the PyTorch extension (one confirm dialog), then list the GPUs."""
        if not dependencies.torch_installed():
            dependencies.ensure_torch()
            self.populateDevices()

    def populateDevices(self) -> None:
        """Fill the device combo box: the CPU, then each CUDA GPU by name (imports torch if it is installed)."""
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for device, label in self.logic.availableDevices():
            combo.addItem(label, device)
        combo.blockSignals(wasBlocked)
        if self._parameterNode and combo.findData(self._parameterNode.device) < 0:
            self._parameterNode.device = "cpu"  # e.g. a scene saved on a computer with a GPU
        self.showDevice()

    def showDevice(self) -> None:
        """Select the parameter node's device in the combo box (if it is listed yet)."""
        combo = self.ui.deviceComboBox
        index = combo.findData(self._parameterNode.device) if self._parameterNode else -1
        if index >= 0:
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(index)
            combo.blockSignals(wasBlocked)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "cpu"


#
# CT2XSynthLogic
#


class CT2XSynthLogic(ScriptedLoadableModuleLogic):
    """Renders X-rays of CT volume nodes; usable without the GUI (Python console, batch scripts).

    Keeps one engine for the last CT node and settings: a ct2x DRRRenderer, so a new angle costs one projection and
    the per-CT preparation (crop, materials, projector set-up) runs only when the CT or a setting changes, or a ct2x
    Synthesizer (CT2X-GAN: the CT and the style encoded once).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._engine = None  # the DRRRenderer or Synthesizer of ...
        self._engineKey = None  # ... this CT node and these settings
        self.lastStatus = ""
        self.lastSeriesFolderName = ""
        self.inputNotices: List[str] = []  # what ct2x changed or doubts about the last prepared CT (e.g. HU + 1024)

    def getParameterNode(self):
        return CT2XSynthParameterNode(super().getParameterNode())

    def clearCache(self) -> None:
        """Free the cached engine (its CT tensors), e.g. between CTs of a batch."""
        self._engine = None
        self._engineKey = None
        self.inputNotices = []

    @staticmethod
    def availableDevices() -> List[Tuple[str, str]]:
        """(torch device, label) pairs: the CPU, then each CUDA GPU by name; imports torch only if installed."""
        if not dependencies.torch_installed():
            return [("cpu", "CPU")]
        dependencies.add_core_to_path()
        from ct2x.device import available_devices

        return available_devices()

    @staticmethod
    def newFilmNode(inputVolumeNode, suffix: str):
        """A new scalar volume node for a film, named after the CT and placed next to it in the subject hierarchy."""
        dependencies.add_core_to_path()
        from CT2XSynthLib import mrml_geometry

        name = slicer.mrmlScene.GenerateUniqueName(f"{inputVolumeNode.GetName()} {suffix}")
        filmNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        mrml_geometry.place_next_to(filmNode, inputVolumeNode)
        return filmNode

    def renderer(self, inputVolumeNode, spectrum: str = "60kV", noisePhotons: int = 0,
                 sourceToDetectorMm: float = SOURCE_TO_DETECTOR_MM,
                 sourceToIsocenterMm: float = SOURCE_TO_ISOCENTER_MM, detectorSizePx: int = DETECTOR_SIZE_PX,
                 pixelSpacingMm: float = 0.0, device: str = "cpu"):
        """The ct2x DRRRenderer of this CT node with these settings, prepared once and cached.

        A pixel spacing of 0 fits the body in view (as `ct2x drr` does by default).
        """
        dependencies.add_core_to_path()

        from ct2x.drr import DRRRenderer, Physics, fitted_detector_spacing_mm
        from ct2x.geometry import CArm

        def prepare(volume):
            carm = CArm(float(sourceToDetectorMm), float(sourceToIsocenterMm))
            spacing = float(pixelSpacingMm) if pixelSpacingMm > 0 else fitted_detector_spacing_mm(
                volume, carm, int(detectorSizePx))  # mm
            carm = carm.with_detector(int(detectorSizePx), spacing)
            physics = Physics(spectrum=spectrum, noise_photons=float(noisePhotons) if noisePhotons > 0 else None)
            return DRRRenderer(volume, carm, physics, device=device, material_maps=False)  # the film alone: faster

        settings = (PHYSICS_ENGINE, spectrum, int(noisePhotons), float(sourceToDetectorMm), float(sourceToIsocenterMm),
                    int(detectorSizePx), float(pixelSpacingMm), device)
        return self._cachedEngine(inputVolumeNode, settings, prepare)

    def synthesizer(self, inputVolumeNode, ganModel: str, style=None, device: str = "cpu"):
        """The ct2x Synthesizer (CT2X-GAN) of this CT node, model and style (a file, or a loaded 2-D picture node),
        with the CT and the style encoded once and cached."""
        dependencies.add_core_to_path()
        from CT2XSynthLib import mrml_geometry

        from ct2x.errors import CT2XInputError
        from ct2x.synthesize import Synthesizer

        if not ganModel:
            raise CT2XInputError("CT2X-GAN: choose a model file (kind ct2x-gan)")
        styleKey = (style.GetID(), style.GetImageData().GetMTime() if style.GetImageData() else None) \
            if hasattr(style, "GetID") else style

        def prepare(volume):
            styleSource = mrml_geometry.film_array(style) if hasattr(style, "GetID") else (style or None)
            return Synthesizer(ganModel, volume, styleSource, device=device)

        return self._cachedEngine(inputVolumeNode, (GAN_ENGINE, ganModel, styleKey, device), prepare)

    def _cachedEngine(self, inputVolumeNode, settings: tuple, prepare):
        """The engine `prepare(CTVolume)` makes for this CT node, kept while the node (its image and placement) and
        `settings` stay the same; the notices ct2x raised while reading the CT go to `inputNotices` and the log."""
        from CT2XSynthLib import mrml_geometry

        from ct2x.errors import CT2XWarning

        imageData = inputVolumeNode.GetImageData()
        key = (inputVolumeNode.GetID(), imageData.GetMTime() if imageData else None,
               tuple(mrml_geometry.ijk_to_world(inputVolumeNode).ravel()), *settings)
        if key != self._engineKey:
            self.clearCache()  # free the previous CT before preparing the next one
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CT2XWarning)
                self._engine = prepare(mrml_geometry.ct_volume_from_node(inputVolumeNode))
            self.inputNotices = [str(warning.message) for warning in caught if warning.category is CT2XWarning]
            for notice in self.inputNotices:
                logging.warning(f"CT2XSynth: {notice}")
            self._engineKey = key
        return self._engine

    def synthesize(self, inputVolumeNode, primaryDeg: float, secondaryDeg: float, ganModel: str, style=None,
                   device: str = "cpu"):
        """The CT2X-GAN film at these angles as a ct2x Radiograph: its view (the model's C-arm about the CT's
        centre), the film in [0, 1] (the training scale: attenuation / its maximum, bone bright) and window 0 ... 1."""
        import numpy as np

        from ct2x.drr import Radiograph

        synthesizer = self.synthesizer(inputVolumeNode, ganModel, style, device)
        film = synthesizer.render(primaryDeg, secondaryDeg)  # (H, W) float32 in [0, 1]
        display = np.round(np.clip(film, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Radiograph(view=synthesizer.view(primaryDeg, secondaryDeg), attenuation=film, display=display,
                          window=(0.0, 1.0))

    def process(self, inputVolumeNode, outputVolumeNode, primaryDeg: float = 0.0, secondaryDeg: float = 0.0,
                engine: str = PHYSICS_ENGINE, spectrum: str = "60kV", noisePhotons: int = 0,
                sourceToDetectorMm: float = SOURCE_TO_DETECTOR_MM,
                sourceToIsocenterMm: float = SOURCE_TO_ISOCENTER_MM, detectorSizePx: int = DETECTOR_SIZE_PX,
                pixelSpacingMm: float = 0.0, device: str = "cpu", ganModel: str = "", style=None,
                showResult: bool = True):
        """Render the X-ray of a CT at C-arm angles into a volume node.

        :param inputVolumeNode: CT in Hounsfield units (vtkMRMLScalarVolumeNode; a linear parent transform is applied).
        :param outputVolumeNode: scalar volume node that receives the film: float32 attenuation -ln(I/I0), one slice
            of detectorSizePx x detectorSizePx pixels with the detector pixel spacing, placed on the detector plane
            (RAS mm), grey colour map with the renderer's window (fixed by its first render).
        :param primaryDeg: horizontal C-arm angle, degrees: 0 = AP, +90 = left lateral, -90 = right lateral.
        :param secondaryDeg: vertical tilt, degrees: cranial +, caudal -.
        :param engine: "Physics DRR", or "CT2X-GAN" (the learned engine: `ganModel` and `style`; the model fixes the
            geometry, so the physics and geometry settings are not used).
        :param spectrum: tube spectrum, "60kV", "90kV" or "120kV".
        :param noisePhotons: photons per pixel for Poisson quantum noise; 0 = noiseless.
        :param sourceToDetectorMm: source-to-detector distance, mm.
        :param sourceToIsocenterMm: source-to-isocentre distance, mm (the isocentre is the CT's centre).
        :param detectorSizePx: detector pixels per side (square).
        :param pixelSpacingMm: detector pixel spacing, mm; 0 = fit the body in view.
        :param device: torch device, "cpu" or "cuda:N".
        :param ganModel: CT2X-GAN engine: a model file of kind ct2x-gan (or its registry name).
        :param style: CT2X-GAN engine: the style X-ray, a file (PNG, JPEG, DICOM) or a loaded 2-D picture node; None
            for a model without a style encoder.
        :param showResult: show the film in the Red slice view and on its detector plane in 3-D.
        :return: the ct2x.drr.Radiograph (attenuation, 8-bit display image, view geometry, window); CT2X-GAN's film
            is on its training scale, attenuation divided by its maximum, in [0, 1].
        """
        if engine not in ENGINES:
            raise ValueError(f"Engine {engine!r} is unknown; use one of {ENGINES}.")
        if not inputVolumeNode or not outputVolumeNode:
            raise ValueError("An input CT volume node and an output volume node are required.")
        dependencies.ensure_torch()
        from CT2XSynthLib import mrml_geometry

        start = time.perf_counter()
        previous = self._engine
        if engine == GAN_ENGINE:
            prepared = self.synthesizer(inputVolumeNode, ganModel, style, device) is not previous
            renderStart = time.perf_counter()
            radiograph = self.synthesize(inputVolumeNode, primaryDeg, secondaryDeg, ganModel, style, device)
        else:
            renderer = self.renderer(inputVolumeNode, spectrum, noisePhotons, sourceToDetectorMm,
                                     sourceToIsocenterMm, detectorSizePx, pixelSpacingMm, device)
            prepared = renderer is not previous
            renderStart = time.perf_counter()
            radiograph = renderer.render(primaryDeg, secondaryDeg)
        mrml_geometry.update_film_node(outputVolumeNode, radiograph)
        outputVolumeNode.SetAttribute("CT2X.engine", engine)
        if engine == GAN_ENGINE:
            outputVolumeNode.SetAttribute("CT2X.model", ganModel)
        renderMs = (time.perf_counter() - renderStart) * 1000.0
        self.lastStatus = _("{primary:+g}°, {secondary:+g}°: {engine}, {ms:.0f} ms on {device}").format(
            primary=primaryDeg, secondary=secondaryDeg, engine=engine, ms=renderMs, device=device)
        if prepared:
            self.lastStatus += _(" (first render of this CT and settings: {seconds:.2f} s with preparation)").format(
                seconds=time.perf_counter() - start)
            for notice in self.inputNotices:
                self.lastStatus += "\n" + _("Note: {notice}").format(notice=notice)
        logging.info(f"CT2XSynth: {self.lastStatus}")
        if showResult:
            mrml_geometry.show_film(outputVolumeNode)
        return radiograph

    def processSeries(self, inputVolumeNode, angles: Union[str, Sequence[float]], secondaryDeg: float = 0.0,
                      showResult: bool = True, **settings) -> list:
        """Render one film per horizontal angle into new nodes, in a subject-hierarchy folder next to the CT.

        :param angles: degrees, a list or text "START:STOP:STEP" (e.g. "-90:90:30"), "a,b,c" or one number.
        :param settings: the keyword arguments of `process` (engine, spectrum, geometry, device).
        :return: the new film nodes, in angle order.
        """
        dependencies.add_core_to_path()
        from CT2XSynthLib import mrml_geometry

        from ct2x.geometry import parse_angles

        primaryAngles = parse_angles(angles) if isinstance(angles, str) else [float(a) for a in angles]
        label = angles if isinstance(angles, str) else ",".join(f"{a:g}" for a in primaryAngles)
        self.lastSeriesFolderName = f"{inputVolumeNode.GetName()} X-ray series {label}"
        folder = mrml_geometry.new_folder_next_to(inputVolumeNode, self.lastSeriesFolderName)
        films = []
        for primaryDeg in primaryAngles:
            film = self.newFilmNode(inputVolumeNode, f"X-ray {primaryDeg:+g}deg")
            mrml_geometry.move_to_folder(film, folder)
            self.process(inputVolumeNode, film, primaryDeg, secondaryDeg, showResult=False, **settings)
            films.append(film)
        if showResult and films:
            mrml_geometry.show_film(films[len(films) // 2])
        return films


#
# CT2XSynthTest
#


class CT2XSynthTest(ScriptedLoadableModuleTest):
    """Renders a small chest phantom through the logic (CPU, seconds, no downloads)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ap_and_lateral_films()
        self.setUp()
        self.test_series_in_folder()

    def _chestNode(self):
        dependencies.ensure_torch()
        dependencies.add_core_to_path()
        from ct2x.phantoms import chest
        from ct2x.vtk_bridge import vtk_from_array, vtk_matrix_from_array

        volume = chest(size=48)  # 48^3 voxels of 2.5 mm, HU
        ctNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chest phantom")
        ctNode.SetAndObserveImageData(vtk_from_array(volume.hu))
        ctNode.SetIJKToRASMatrix(vtk_matrix_from_array(volume.affine))
        ctNode.CreateDefaultDisplayNodes()
        return ctNode

    def test_ap_and_lateral_films(self):
        self.delayDisplay("Rendering a chest phantom at 0 and 90 degrees")
        ctNode = self._chestNode()
        filmNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "film")
        logic = CT2XSynthLogic()
        for primaryDeg in (0.0, 90.0):
            radiograph = logic.process(ctNode, filmNode, primaryDeg, 0.0, detectorSizePx=64, pixelSpacingMm=4.0)
            self.assertEqual(filmNode.GetImageData().GetDimensions(), (64, 64, 1))
            self.assertEqual(filmNode.GetImageData().GetScalarType(), vtk.VTK_FLOAT)
            for axis in range(2):
                self.assertAlmostEqual(filmNode.GetSpacing()[axis], 4.0, places=6)
            low, high = filmNode.GetImageData().GetScalarRange()
            self.assertLess(low, 0.1)  # air around the body
            self.assertGreater(high, 1.0)  # bone and tissue attenuate
            ijkToRas = vtk.vtkMatrix4x4()
            filmNode.GetIJKToRASMatrix(ijkToRas)
            center = ijkToRas.MultiplyPoint([31.5, 31.5, 0.0, 1.0])  # the film's centre is the detector's
            for axis in range(3):
                self.assertAlmostEqual(center[axis], radiograph.view.detector_center_ras[axis], places=3)
        self.delayDisplay("Test passed")

    def test_series_in_folder(self):
        self.delayDisplay("Rendering a series of three views into a folder")
        ctNode = self._chestNode()
        films = CT2XSynthLogic().processSeries(ctNode, "-30:30:30", detectorSizePx=32, pixelSpacingMm=8.0)
        self.assertEqual(len(films), 3)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        folders = {shNode.GetItemParent(shNode.GetItemByDataNode(film)) for film in films}
        self.assertEqual(len(folders), 1)
        self.assertEqual(shNode.GetItemName(folders.pop()), "chest phantom X-ray series -30:30:30")
        self.assertEqual([film.GetAttribute("CT2X.primaryAngleDeg") for film in films], ["-30", "0", "30"])
        self.delayDisplay("Test passed")
