"""The 3D Slicer extension's files, checked without Slicer: CMake lists, catalog entry, .ui names, Python 3.9.

A file missing from a module's CMake lists is silently not installed; a widget name or parameter-node field that
does not match the .ui fails only when the module opens in Slicer. These tests catch both here.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = "CT2XSynth"
MODULE_DIR = ROOT / MODULE
MODULE_PY = MODULE_DIR / f"{MODULE}.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE}.ui"
MODULES = ("CT2XSynth", "CT2XReconstruct")  # the extension's modules, each checked alike
SCHEMA = ROOT / "tests" / "data" / "slicer-extension-catalog-entry-schema-v1.0.2.json"

# Widget class -> parameter types its Slicer GUI connector accepts (slicer/parameterNodeWrapper/guiConnectors.py).
CONNECTOR_TYPES = {
    "ctkSliderWidget": {"float"},
    "QDoubleSpinBox": {"float"},
    "QSpinBox": {"int"},
    "QCheckBox": {"bool"},
    "QLineEdit": {"str"},
    "QComboBox": {"str", "int", "float", "bool"},
    "qMRMLNodeComboBox": {"vtkMRMLScalarVolumeNode", "vtkMRMLVolumeNode", "vtkMRMLNode"},
}


_CMAKE_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|#[^\n]*|[()]|[^\s()"#]+')


def _cmake_commands(path: Path) -> List[List[str]]:
    """Each CMake command as [name, arg, ...]: comments dropped, quoted arguments kept whole (with their quotes)."""
    commands, current, depth = [], None, 0
    for token in _CMAKE_TOKEN.findall(path.read_text(encoding="utf-8")):
        if token.startswith("#"):
            continue
        if current is None:
            current = [token.lower()]  # a command name; its "(" follows
        elif token == "(":
            depth += 1
            if depth > 1:
                current.append(token)
        elif token == ")":
            depth -= 1
            if depth == 0:
                commands.append(current)
                current = None
            else:
                current.append(token)
        else:
            current.append(token)
    return commands


def _cmake_variables(path: Path) -> Dict[str, List[str]]:
    """set(NAME values...) of a CMakeLists, with ${VAR} of earlier set() expanded and quotes removed."""
    variables: Dict[str, List[str]] = {}
    for command in _cmake_commands(path):
        if command[0] == "set" and len(command) > 1:
            values = [re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [])), v).strip('"')
                      for v in command[2:]]
            variables[command[1]] = values
    return variables


def _ui_tree(module: str = MODULE) -> ET.Element:
    return ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui").getroot()


def _ui_widgets(module: str = MODULE) -> Dict[str, ET.Element]:
    return {w.get("name"): w for w in _ui_tree(module).iter("widget")}


def _bound_widgets(module: str = MODULE) -> Dict[str, ET.Element]:
    """SlicerParameterName -> widget element."""
    bound = {}
    for widget in _ui_tree(module).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget
    return bound


def _parameter_node_fields(module: str = MODULE) -> Dict[str, ast.expr]:
    """Field name -> annotation of the @parameterNodeWrapper class in the module file."""
    module_py = ROOT / module / f"{module}.py"
    tree = ast.parse(module_py.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: item.annotation for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError(f"no @parameterNodeWrapper class in {module_py}")


def _base_type(annotation: ast.expr) -> str:
    """'float' for `float` and for `Annotated[float, ...]`; the class name for a node type."""
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name) \
            and annotation.value.id == "Annotated":
        return _base_type(annotation.slice.elts[0])
    assert isinstance(annotation, ast.Name), ast.dump(annotation)
    return annotation.id


def _annotation_calls(annotation: ast.expr) -> Set[str]:
    """Names of validators such as WithinRange, Choice used in an annotation."""
    return {n.func.id for n in ast.walk(annotation) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _module_files(module: str = MODULE) -> Set[str]:
    """Files of the module folder that Slicer must install (tests and CMake files excluded)."""
    files = set()
    for path in (ROOT / module).rglob("*"):
        relative = path.relative_to(ROOT / module)
        if (path.is_file() and relative.parts[0] != "Testing" and "__pycache__" not in relative.parts
                and path.name != "CMakeLists.txt"):
            files.add(relative.as_posix())
    return files


def _png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


# --- CMake lists ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES)
def test_every_module_file_is_listed_in_the_module_cmakelists(module):
    variables = _cmake_variables(ROOT / module / "CMakeLists.txt")
    assert variables["MODULE_NAME"] == [module]
    listed = variables["MODULE_PYTHON_SCRIPTS"] + variables["MODULE_PYTHON_RESOURCES"]

    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert _module_files(module) - set(listed) == set(), "not listed, so not installed with the extension"
    assert set(listed) - _module_files(module) == set(), "listed but missing"
    assert all(f.endswith(".py") for f in variables["MODULE_PYTHON_SCRIPTS"])
    assert {f"{module}Lib/__init__.py", f"{module}.py"} <= set(variables["MODULE_PYTHON_SCRIPTS"])


@pytest.mark.parametrize("module", MODULES)
def test_module_cmakelists_builds_the_module_and_its_self_test(module):
    MODULE_DIR = ROOT / module
    commands = _cmake_commands(MODULE_DIR / "CMakeLists.txt")
    build = next(c for c in commands if c[0] == "slicermacrobuildscriptedmodule")
    assert {"SCRIPTS", "${MODULE_PYTHON_SCRIPTS}", "RESOURCES", "${MODULE_PYTHON_RESOURCES}"} <= set(build)
    assert ["slicer_add_python_unittest", "SCRIPT", "${MODULE_NAME}.py"] in commands
    assert ["add_subdirectory", "Testing"] in commands
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").is_file()
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_top_level_cmakelists_declares_the_extension():
    path = ROOT / "CMakeLists.txt"
    commands = _cmake_commands(path)
    variables = _cmake_variables(path)
    text = path.read_text(encoding="utf-8")

    assert ["project", "CT2X"] in commands
    assert ["find_package", "Slicer", "REQUIRED"] in commands
    for module in MODULES:
        assert text.index(f"add_subdirectory({module})") < text.index("## NEXT_MODULE")
    assert text.index("## NEXT_MODULE") < text.index("include(${Slicer_EXTENSION_CPACK})")
    for name in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert variables[f"EXTENSION_{name}"] and variables[f"EXTENSION_{name}"][0], name
    assert variables["EXTENSION_DEPENDS"] == ["PyTorch"]


def test_icon_and_screenshot_urls_point_at_pngs_in_the_repository():
    variables = _cmake_variables(ROOT / "CMakeLists.txt")
    homepage = variables["EXTENSION_HOMEPAGE"][0]
    raw_prefix = homepage.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    urls = variables["EXTENSION_ICONURL"] + variables["EXTENSION_SCREENSHOTURLS"][0].split()
    for url in urls:
        assert url.startswith(raw_prefix), url
        _png_size(ROOT / url[len(raw_prefix):])
    assert _png_size(ROOT / variables["EXTENSION_ICONURL"][0][len(raw_prefix):]) == (128, 128)
    for module in MODULES:
        assert _png_size(ROOT / module / "Resources" / "Icons" / f"{module}.png") == (128, 128)


def test_the_core_package_globs_cover_every_file_of_ct2x():
    patterns = _cmake_variables(ROOT / "CMakeLists.txt")["CT2X_CORE_PATTERNS"]
    core_files = [p.relative_to(ROOT).as_posix() for p in (ROOT / "ct2x").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts]

    uncovered = [f for f in core_files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]

    assert "ct2x/physics/tables.npz" in core_files
    assert uncovered == [], "add their patterns to CT2X_CORE_PATTERNS or Slicer will not ship them"


# --- catalog entry -------------------------------------------------------------------------------------------


def test_catalog_entry_validates_against_the_schema_and_matches_the_cmake_metadata():
    jsonschema = pytest.importorskip("jsonschema")
    entry = json.loads((ROOT / "SlicerExtension.json").read_text(encoding="utf-8"))
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    variables = _cmake_variables(ROOT / "CMakeLists.txt")
    project = next(c[1] for c in _cmake_commands(ROOT / "CMakeLists.txt") if c[0] == "project")

    jsonschema.validate(entry, schema)
    assert entry["$schema"] == schema["$id"]
    assert entry["category"] == variables["EXTENSION_CATEGORY"][0]
    assert entry["scm_url"] == variables["EXTENSION_HOMEPAGE"][0]
    assert entry["build_dependencies"] == variables["EXTENSION_DEPENDS"]
    # The entry is submitted as <project>.json; the index wants the name without and the repository with "Slicer".
    assert project == "CT2X" and not project.startswith("Slicer")
    assert entry["scm_url"].rsplit("/", 1)[1] == f"Slicer{project}"


def test_catalog_validation_rejects_an_unknown_key():
    jsonschema = pytest.importorskip("jsonschema")
    entry = json.loads((ROOT / "SlicerExtension.json").read_text(encoding="utf-8"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(entry, scmurl=entry["scm_url"]), json.loads(SCHEMA.read_text(encoding="utf-8")))


# --- .ui and parameter node ----------------------------------------------------------------------------------


# Per module: widgets its Python must use, and fields bound to widgets (so a rename on either side is caught).
UI_NAMES_USED = {
    "CT2XSynth": {"applyButton", "statusLabel", "deviceComboBox", "generateSeriesButton"},
    "CT2XReconstruct": {"reconstructButton", "cancelButton", "progressBar", "statusLabel", "deviceComboBox",
                        "modelComboBox", "metricsTableView", "simulateButton", "importOfficialButton"},
}
BOUND_FIELDS = {
    "CT2XSynth": {"inputVolume", "outputVolume", "primaryAngleDeg", "secondaryAngleDeg", "liveUpdate"},
    "CT2XReconstruct": {"paVolume", "paFile", "lateralVolume", "lateralFile", "modelFile", "invert", "crop",
                        "lateralFacing", "precision", "outputVolume", "referenceVolume", "simulateVolume"},
}


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_name_the_module_python_uses_exists_in_the_ui(module):
    used = set()
    for path in (ROOT / module).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "self"):
                used.add(node.attr)

    assert UI_NAMES_USED[module] <= used
    assert used - set(_ui_widgets(module)) == set()


@pytest.mark.parametrize("module", MODULES)
def test_every_bound_widget_is_a_parameter_node_field_of_a_type_its_connector_accepts(module):
    fields = _parameter_node_fields(module)
    bound = _bound_widgets(module)

    assert set(bound) - set(fields) == set(), "SlicerParameterName without a parameter-node field"
    for name, widget in bound.items():
        widget_class, annotation = widget.get("class"), fields[name]
        assert _base_type(annotation) in CONNECTOR_TYPES[widget_class], (name, widget_class)
        if widget_class == "QComboBox":
            assert "Choice" in _annotation_calls(annotation), f"{name}: a QComboBox needs Choice([...])"
        if widget_class == "ctkSliderWidget":
            assert "WithinRange" in _annotation_calls(annotation), f"{name}: a slider needs WithinRange"
    assert BOUND_FIELDS[module] <= set(bound)


@pytest.mark.parametrize("module", MODULES)
def test_parameter_node_annotations_run_on_python_3_9(module):
    for name, annotation in _parameter_node_fields(module).items():
        assert not any(isinstance(n, ast.BinOp) for n in ast.walk(annotation)), f"{name}: `X | Y` fails on 3.9"


def test_ui_layout_has_the_sections_scene_connections_and_ranges():
    root = _ui_tree()
    widgets = _ui_widgets()
    top = root.find("widget")
    sections = {w.findtext("property[@name='text']/string"): w for w in root.iter("widget")
                if w.get("class") == "ctkCollapsibleButton"}
    scene_signal = "mrmlSceneChanged(vtkMRMLScene*)"
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top.get("name") and c.findtext("signal") == scene_signal}

    assert top.get("class") == "qMRMLWidget"
    assert list(sections) == ["Inputs", "View", "CT2X-GAN", "Physics", "Advanced", "Outputs"]
    assert sections["Advanced"].findtext("property[@name='collapsed']/bool") == "true"
    assert receivers == {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    primary = widgets["primaryAngleSliderWidget"]
    limits = [float(primary.findtext(f"property[@name='{name}']/double")) for name in ("minimum", "maximum")]
    assert limits == [-90.0, 90.0]
    assert widgets["outputVolumeSelector"].findtext("property[@name='noneEnabled']/bool") == "true"  # create new
    assert "SlicerParameterName" not in {p.get("name") for p in widgets["deviceComboBox"].findall("property")}


def test_reconstruct_ui_has_the_sections_scene_connections_and_hand_filled_combo_boxes():
    module = "CT2XReconstruct"
    root = _ui_tree(module)
    widgets = _ui_widgets(module)
    top = root.find("widget")
    sections = {w.findtext("property[@name='text']/string"): w for w in root.iter("widget")
                if w.get("class") == "ctkCollapsibleButton"}
    scene_signal = "mrmlSceneChanged(vtkMRMLScene*)"
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top.get("name") and c.findtext("signal") == scene_signal}

    assert top.get("class") == "qMRMLWidget" and top.get("name") == module
    assert list(sections) == ["Inputs", "Model", "Preprocessing", "Outputs", "Reference CT", "Simulate films",
                              "Advanced"]
    for name in ("Reference CT", "Simulate films", "Advanced"):
        assert sections[name].findtext("property[@name='collapsed']/bool") == "true", name
    assert receivers == {n for n, w in widgets.items() if w.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView")}
    assert widgets["outputVolumeSelector"].findtext("property[@name='noneEnabled']/bool") == "true"  # create new
    for name in ("deviceComboBox", "modelComboBox"):  # filled at run time, synchronised by hand
        assert "SlicerParameterName" not in {p.get("name") for p in widgets[name].findall("property")}
    for name, choices in (("invertComboBox", ["auto", "yes", "no"]), ("cropComboBox", ["auto", "none"]),
                          ("lateralFacingComboBox", ["auto", "left", "right"]),
                          ("precisionComboBox", ["fp32", "bf16"])):
        assert [item.findtext("property/string") for item in widgets[name].findall("item")] == choices, name


# --- Python 3.9 and lazy imports ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(p for module in MODULES for p in (ROOT / module).rglob("*.py")),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_python_parses_as_python_3_9(path):
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def _top_level_imports(path: Path) -> Set[str]:
    """Top-level package names imported when the file is imported (function bodies excluded)."""
    names = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
                      + [s for h in getattr(node, "handlers", []) for s in h.body])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return names


@pytest.mark.parametrize("module", MODULES)
def test_the_module_imports_neither_torch_nor_ct2x_when_slicer_loads_it(module):
    module_py = ROOT / module / f"{module}.py"
    assert {"slicer", "qt", f"{module}Lib"} <= _top_level_imports(module_py)
    loaded = _lib_files_imported_by(module_py, module)
    assert ROOT / module / f"{module}Lib" / "dependencies.py" in loaded
    for path in [module_py] + loaded:  # what loading the module imports
        assert path.is_file() and _top_level_imports(path) & {"torch", "ct2x", "tqdm"} == set(), path.name


def _lib_files_imported_by(module_py: Path, module: str) -> List[Path]:
    """The <module>Lib files a module file imports at its top level (`from <module>Lib import x`, `from
    <module>Lib.x import y`), with the package's __init__.py."""
    lib = ROOT / module / f"{module}Lib"
    files = {lib / "__init__.py"}
    for node in ast.parse(module_py.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module == f"{module}Lib":
            files |= {lib / f"{alias.name}.py" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{module}Lib."):
            files.add(lib / f"{node.module.split('.')[1]}.py")
    return sorted(files)


def test_only_the_vtk_bridge_imports_vtk_in_the_core():
    importers = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ct2x").rglob("*.py")
                 if _top_level_imports(p) & {"vtk", "vtkmodules"}}
    assert importers == {"ct2x/vtk_bridge.py"}
    assert "torch" not in _top_level_imports(ROOT / "ct2x" / "vtk_bridge.py")


def test_values_the_module_restates_match_the_core():
    """CT2XSynth restates a few ct2x values so that Slicer's start-up need not import ct2x; they must agree."""
    from ct2x import geometry
    from ct2x.physics import SPECTRA

    restated = {node.targets[0].id: ast.literal_eval(node.value)
                for node in ast.parse(MODULE_PY.read_text(encoding="utf-8")).body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("SPECTRA", "SOURCE_TO_DETECTOR_MM", "SOURCE_TO_ISOCENTER_MM",
                                           "DETECTOR_SIZE_PX")}
    assert restated == {"SPECTRA": list(SPECTRA), "SOURCE_TO_DETECTOR_MM": geometry.SOURCE_TO_DETECTOR_MM,
                        "SOURCE_TO_ISOCENTER_MM": geometry.SOURCE_TO_ISOCENTER_MM,
                        "DETECTOR_SIZE_PX": geometry.DETECTOR_SIZE_PX}


def test_values_the_reconstruct_module_restates_match_the_core():
    """CT2XReconstruct restates the preprocessing choices, precisions and model kinds (importing them imports
    torch)."""
    from ct2x.data.films import CROP_CHOICES, FACING_CHOICES, INVERT_CHOICES
    from ct2x.precision import PRECISIONS
    from ct2x.reconstruct import RECONSTRUCTION_KINDS

    names = ("INVERT_CHOICES", "CROP_CHOICES", "FACING_CHOICES", "PRECISIONS", "RECON_KINDS")
    module_py = ROOT / "CT2XReconstruct" / "CT2XReconstruct.py"
    restated = {node.targets[0].id: ast.literal_eval(node.value)
                for node in ast.parse(module_py.read_text(encoding="utf-8")).body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in names}
    assert restated == {"INVERT_CHOICES": list(INVERT_CHOICES), "CROP_CHOICES": list(CROP_CHOICES),
                        "FACING_CHOICES": list(FACING_CHOICES), "PRECISIONS": list(PRECISIONS),
                        "RECON_KINDS": list(RECONSTRUCTION_KINDS)}
