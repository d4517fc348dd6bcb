import numpy as np
import pytest
import torch

from ct2x import phantoms
from ct2x.geometry import CArm, Detector
from ct2x.projector import SliceWarpProjector, backproject, backproject_view, project, reference_projection, slicewarp

RADIUS = 40.0  # mm, sphere phantom


def sphere_chords(view, center=(0.0, 0.0, 0.0), radius=RADIUS):
    """Analytic chord length (mm) of every pixel's ray through a sphere."""
    origins, directions = view.rays()
    offset = origins - np.asarray(center)
    b = (offset * directions).sum(-1)
    disc = b**2 - ((offset**2).sum(-1) - radius**2)
    return 2 * np.sqrt(np.clip(disc, 0, None))


@pytest.fixture(scope="module")
def sphere():
    values, affine = phantoms.sphere((64, 64, 64), 1.5, RADIUS)  # 96 mm grid
    return torch.from_numpy(values)[None, None], affine


@pytest.mark.parametrize("beam", ["cone", "parallel"])
@pytest.mark.parametrize("primary, secondary", [(0, 0), (90, 0), (30, 0), (-60, 20)])
def test_sphere_line_integrals_match_chords(sphere, beam, primary, secondary):
    volume, affine = sphere
    view = CArm(beam=beam, detector=Detector.square(64, 3.0)).view(primary, secondary)
    image = project(volume, affine, [view], antialias=False)[0, 0, 0].double().numpy()  # point-sampled rays
    chords = sphere_chords(view)
    inner = chords > 0.7 * 2 * RADIUS  # rays well inside the partial-volume rim
    np.testing.assert_allclose(image[inner], chords[inner], rtol=0.01)
    assert np.linalg.norm(image - chords) / np.linalg.norm(chords) < 0.03  # rim blur only


def test_cylinder_line_integrals_match_chords():
    values, affine = phantoms.cylinder((64, 64, 64), 2.0, radius_mm=30.0, half_length_mm=50.0)
    volume = torch.from_numpy(values)[None, None]
    for beam in ("cone", "parallel"):
        view = CArm(beam=beam, detector=Detector.square(64, 2.5)).view(0, 0)
        image = project(volume, affine, [view], antialias=False)[0, 0, 0].double().numpy()
        origins, directions = view.rays()
        # A ray through the side of an infinite z-cylinder: solve |xy(o + t d)| = r.
        o, d = origins[..., :2], directions[..., :2]
        a, b, c = (d**2).sum(-1), (o * d).sum(-1), (o**2).sum(-1) - 30.0**2
        chords = 2 * np.sqrt(np.clip(b**2 - a * c, 0, None)) / np.sqrt(a)
        mid_rows = slice(24, 40)  # rays that stay between the end caps
        inner = chords[mid_rows] > 0.7 * 60.0
        np.testing.assert_allclose(image[mid_rows][inner], chords[mid_rows][inner], rtol=0.01)


def test_fast_projector_matches_dense_reference_on_oblique_views():
    rng = np.random.default_rng(0)
    volume = torch.nn.functional.avg_pool3d(torch.from_numpy(rng.random((1, 1, 40, 36, 32))), 3, 1, 1)
    affine = np.array([[-1.2, 0.1, 0, 20], [0.05, -1.1, 0, 15], [0, 0, 1.6, -30], [0, 0, 0, 1.0]])
    center = affine[:3, :3] @ ((np.array([32, 36, 40]) - 1) / 2) + affine[:3, 3]
    for primary, secondary in [(20, 0), (-45, 15), (110, -10)]:
        view = CArm(detector=Detector(48, 40, (1.5, 1.7))).view(primary, secondary, center)
        exact = reference_projection(volume[0], affine, view, step_mm=0.1)[0]
        joseph = project(volume, affine, [view], antialias=False)[0, 0, 0]
        assert torch.norm(joseph - exact) / torch.norm(exact) < 0.005
        filtered = project(volume, affine, [view])[0, 0, 0]
        assert torch.norm(filtered - exact) / torch.norm(exact) < 0.01


def test_wide_cone_oblique_view_splits_the_detector_by_main_axis():
    rng = np.random.default_rng(3)
    volume = torch.nn.functional.avg_pool3d(torch.from_numpy(rng.random((1, 1, 32, 32, 32))), 3, 1, 1)
    affine = phantoms.grid_affine((32, 32, 32), 3.0)
    view = CArm(detector=Detector.square(80, 10.0)).view(45, 0)  # 800 mm detector: a +-21 deg cone
    projector = SliceWarpProjector(volume, affine)
    assert sorted(plan.main for plan in projector._plans(view)) == [0, 1]  # half the rays cross i, half j
    exact = reference_projection(volume[0], affine, view, step_mm=0.1)[0]
    joseph = project(volume, affine, [view], antialias=False)[0, 0, 0]
    assert torch.norm(joseph - exact) / torch.norm(exact) < 0.005
    assert torch.norm(projector.project([view])[0, 0, 0] - exact) / torch.norm(exact) < 0.01


def test_volume_reaching_past_the_detector_is_cut_at_the_detector():
    values, affine = phantoms.sphere((48, 48, 48), 4.0, 80.0)  # 190 mm grid, sphere 80 mm
    volume = torch.from_numpy(values)[None, None]
    view = CArm(300, 240, Detector.square(32, 6.0)).view(0, 0)  # detector 60 mm behind the centre
    exact = reference_projection(volume[0], affine, view, step_mm=0.5)[0]
    fast = project(volume, affine, [view], antialias=False)[0, 0, 0]
    assert torch.norm(fast - exact) / torch.norm(exact) < 0.01
    full = reference_projection(volume[0], affine, CArm(700, 240, Detector.square(32, 6.0)).view(0, 0), 0.5)[0]
    assert full.sum() > 1.2 * exact.sum()  # the cut matters for this geometry



def test_rays_crossing_a_main_axis_both_ways_count_the_slabs_in_front_of_the_source():
    """A source inside the volume with a wide cone: rays leave it towards both ends of an index axis. Counted in one
    direction per region, half of them summed the slabs behind the source (0.31 from the reference, now 0.05)."""
    rng = np.random.default_rng(5)
    volume = torch.nn.functional.avg_pool3d(torch.from_numpy(rng.random((1, 1, 30, 34, 38))), 3, 1, 1)
    affine = np.array([[-1.2, 0.1, 0, 20], [0.05, -1.1, 0, 15], [0, 0, 1.6, -30], [0, 0, 0, 1.0]])
    center = affine[:3, :3] @ ((np.array([38, 34, 30]) - 1) / 2) + affine[:3, 3]
    view = CArm(60, 10, Detector(40, 36, (8.0, 7.0))).view(0, 0, center)  # source 10 mm before the centre
    mains = [plan.main for plan in SliceWarpProjector(volume, affine)._plans(view)]
    assert len(mains) > len(set(mains))  # an axis crossed both ways: a region per direction
    exact = reference_projection(volume[0], affine, view, step_mm=0.1)[0]
    joseph = project(volume, affine, [view], antialias=False)[0, 0, 0]
    assert torch.norm(joseph - exact) / torch.norm(exact) < 0.07

def marker_pixel(position_ras, primary):
    """Where a bright voxel at `position_ras` lands (row, column) in the view at `primary` degrees."""
    shape = (48, 48, 48)
    affine = phantoms.grid_affine(shape, 2.0)
    volume = np.zeros(shape, dtype=np.float32)
    i, j, k = np.round(np.linalg.solve(affine, [*position_ras, 1.0])[:3]).astype(int)
    volume[k, j, i] = 1.0
    view = CArm(detector=Detector.square(64, 2.5)).view(primary, 0)
    image = project(torch.from_numpy(volume)[None, None], affine, [view], mode="max")[0, 0, 0]
    return np.unravel_index(int(image.argmax()), image.shape)


@pytest.mark.parametrize("primary", [0, 180])
def test_frontal_views_show_the_patients_left_on_the_image_right(primary):
    _, column = marker_pixel((-30.0, 0.0, 0.0), primary)  # RAS: -x is the patient's left
    assert column > 32 + 5


@pytest.mark.parametrize("primary, anterior_side", [(90, "right"), (-90, "left")])
def test_lateral_views_place_the_front_of_the_patient(primary, anterior_side):
    _, column = marker_pixel((0.0, 30.0, 0.0), primary)  # +y is anterior
    assert (column > 32 + 5) if anterior_side == "right" else (column < 32 - 5)


@pytest.mark.parametrize("primary", [0, 90, 180, -90])
def test_head_is_at_the_top(primary):
    row, _ = marker_pixel((0.0, 0.0, 30.0), primary)
    assert row < 32 - 5


def test_batches_of_volumes_and_views():
    rng = np.random.default_rng(1)
    volumes = torch.from_numpy(rng.random((2, 3, 16, 18, 20)).astype(np.float32))
    affine = phantoms.grid_affine((16, 18, 20), 2.0)
    views = [CArm(detector=Detector(12, 10, (4.0, 4.0))).view(a, 0) for a in (0, 45, 90)]
    batch = project(volumes, affine, views)
    assert batch.shape == (2, 3, 3, 10, 12)
    single = project(volumes[1:2, 2:3], affine, views[1:2])
    torch.testing.assert_close(batch[1, 1, 2], single[0, 0, 0])


@pytest.mark.parametrize("antialias", [False, True])
def test_backprojector_is_the_adjoint(antialias):
    rng = np.random.default_rng(2)
    shape = (20, 24, 28)
    affine = np.array([[-2.0, 0, 0, 30], [0, -2.1, 0.2, 20], [0, 0.1, 2.5, -20], [0, 0, 0, 1]])
    views = [CArm(detector=Detector(16, 12, (6.0, 6.0))).view(a, b) for a, b in ((0, 0), (70, 10), (180, 0))]
    x = torch.from_numpy(rng.standard_normal((1, 2, *shape)))
    y = torch.from_numpy(rng.standard_normal((1, 3, 2, 12, 16)))
    ax = project(x, affine, views, antialias=antialias)
    aty = backproject(y, affine, shape, views, antialias=antialias)
    lhs, rhs = (ax * y).sum(), (x * aty).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-4


def test_gradcheck_on_a_tiny_volume():
    affine = phantoms.grid_affine((4, 5, 6), 3.0)
    views = [CArm(detector=Detector(5, 4, (5.0, 5.0))).view(20, 10),
             CArm(detector=Detector(5, 4, (1.0, 1.0))).view(40, 10)]  # straight and sheared slabs
    projector = SliceWarpProjector(torch.zeros(1, 1, 4, 5, 6), affine)
    assert [plan.stack_key[4:6] != (0, 0) for view in views for plan in projector._plans(view)] == [False, True]
    volume = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: project(v, affine, views), (volume,))


def test_gradcheck_through_merged_slabs_and_uneven_filters():
    """Gradients flow through a stack merged from shorter slabs and through in-plane filters that do not divide the
    volume (short last runs)."""
    volume = torch.rand(1, 2, 6, 7, 9, dtype=torch.float64, requires_grad=True)  # (B, C, K, J, I)
    view = CArm(detector=Detector.square(6, 8.0)).view(0, 0, (np.array([9, 7, 6]) - 1) / 2)

    def merged(v: torch.Tensor) -> SliceWarpProjector:
        return SliceWarpProjector(v, np.eye(4), merge_slabs=True, slab_lengths=(1, 2, 4), max_slab=4, shear=False)

    assert [merged(volume)._merged_from(plan.stack_key + ("sum",)) for plan in merged(volume)._plans(view)] == [
        (1, 2, 3, 4, 0, 0, False, "sum")]  # slabs of 4 from those of 2 (7 slices across j), i filtered by 4 (9 voxels)
    assert torch.autograd.gradcheck(lambda v: merged(v).project([view]), (volume,))


def test_cached_projector_reuses_reslicing_and_is_repeatable(sphere):
    volume, affine = sphere
    projector = SliceWarpProjector(volume, affine)
    views = [CArm(detector=Detector.square(32, 4.0)).view(a, 0) for a in (0, 5, 10)]
    projector.prepare(views)
    cached = len(projector._stacks)
    first = projector.project(views)
    assert len(projector._stacks) == cached  # a slider move re-uses the prepared slices
    torch.testing.assert_close(first, projector.project(views))


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_a_view_gives_the_same_image_whatever_the_projector_did_before(sphere, mode):
    """The image is a function of the view: a projector that has cached other views' slabs (shorter ones from an
    oblique view, longer ones from a frontal one) gives bitwise the image of a fresh projector."""
    volume, affine = sphere
    carm = CArm(detector=Detector.square(32, 4.0))
    views = [carm.view(angle, tilt) for angle, tilt in ((0, 0), (17, 0), (30, 0), (45, 0), (75, 0), (30, 35))]
    used = SliceWarpProjector(volume, affine)
    for view in views[::-1]:
        used.project([view], mode)
    assert len({key[1:6] for key in used._stacks}) > 1  # slabs of more than one length or shear are cached
    for view in views:
        fresh = SliceWarpProjector(volume, affine).project([view], mode)
        assert torch.equal(used.project([view], mode), fresh)


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_reslicing_pads_short_windows_with_zeros(mode):
    """A re-sliced stack is the volume zero-padded to whole windows, summed (or maximised) over slabs and averaged
    (or maximised) in-plane, for every main axis; negative values too, so that a short window's zeros show in max."""
    volume = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3, 7, 9, 11)))  # (B, C, K, J, I)
    projector = SliceWarpProjector(volume, np.eye(4))
    for main, slab, pool_rows, pool_cols in ((0, 4, 2, 3), (1, 3, 2, 2), (2, 2, 4, 1), (0, 1, 1, 1)):
        sizes = {4: 11, 3: 9, 2: 7}  # tensor dim -> size
        (row_dim, col_dim), main_dim = slicewarp._SLICE_LAYOUT[main][0], slicewarp._MAIN_DIM[main]
        steps = {main_dim: slab, row_dim: pool_rows, col_dim: pool_cols}
        padded = torch.nn.functional.pad(volume, [p for dim in (4, 3, 2) for p in (0, -sizes[dim] % steps[dim])])
        shape = [2, 3] + [n for dim in (2, 3, 4) for n in (padded.shape[dim] // steps[dim], steps[dim])]
        blocks = padded.reshape(shape)  # (B, C, K', k, J', j, I', i)
        slab_dim, window_dims = {2: 3, 3: 5, 4: 7}[main_dim], (3, 5, 7)
        in_plane = [d for d in window_dims if d != slab_dim]
        if mode == "sum":
            expected = blocks.mean(in_plane, keepdim=True).sum(slab_dim, keepdim=True)
        else:
            expected = blocks.amax(window_dims, keepdim=True)
        expected = expected.reshape(2 * 3, *(shape[d - 1] for d in window_dims))  # (B*C, K', J', I')
        expected = expected.permute(main_dim - 1, 0, row_dim - 1, col_dim - 1)  # (slabs, B*C, rows, cols)
        torch.testing.assert_close(projector._reslice(main, slab, pool_rows, pool_cols, mode=mode), expected)


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_slabs_are_merged_from_their_shortest_divisor_as_if_resliced(mode):
    """With `merge_slabs`, a straight stack whose slab length is not prime comes from the stack of its shortest divisor
    above 1 (runs of neighbours summed or maximised, a short last run padded with zeros), and equals the stack
    re-sliced from the volume, for every main axis and lengths that the slabs divide or not; negative values too, so
    that a short run's zeros show in max. Without it every stack is re-sliced."""
    volume = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 2, 7, 9, 12)))  # (B, C, K, J, I)
    projector = SliceWarpProjector(volume, np.eye(4), merge_slabs=True)
    for main, slab, pool_rows, pool_cols, divisor in ((0, 4, 2, 3, 2), (0, 8, 1, 1, 2), (1, 4, 2, 2, 2),
                                                      (1, 8, 1, 2, 2), (2, 4, 3, 1, 2), (2, 6, 1, 1, 2),
                                                      (0, 6, 1, 2, 2), (0, 9, 1, 1, 3), (1, 9, 1, 2, 3)):
        base = (main, divisor, pool_rows, pool_cols, 0, 0, False, mode)
        assert projector._merged_from((main, slab, pool_rows, pool_cols, 0, 0, False, mode)) == base
        merged = projector._stack(main, slab, pool_rows, pool_cols, 0, 0, False, mode)
        torch.testing.assert_close(merged, projector._reslice(main, slab, pool_rows, pool_cols, mode=mode))
        assert base in projector._stacks
    for key in ((0, 3, 1, 1, 0, 0, False, "sum"), (0, 2, 1, 1, 0, 0, False, "sum"), (0, 5, 1, 1, 0, 0, False, "sum"),
                (0, 4, 1, 1, 1, 0, False, "sum")):
        assert projector._merged_from(key) is None  # prime lengths and sheared slabs: re-sliced
    assert SliceWarpProjector(volume, np.eye(4))._merged_from((0, 4, 1, 1, 0, 0, False, "sum")) is None


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_stacks_sharing_an_in_plane_filter_are_built_from_one_filtering_as_if_alone(mode, monkeypatch):
    """Stacks re-sliced from the volume that filter j and i alike start from one in-plane filtering, which `_build`
    makes first (a few slices per task, on the workers) and drops after: each stack holds bitwise the numbers it has
    when built alone."""
    volume = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 2, 9, 10, 11)))  # (B, C, K, J, I)
    keys = {(2, 2, 2, 3, 0, 0, False, mode), (2, 3, 2, 3, 0, 0, False, mode),
            (0, 3, 1, 2, 0, 0, False, mode)}  # j by 2, i by 3 in-plane
    together = SliceWarpProjector(volume, np.eye(4), workers=2)
    runs_along, passes_along_i = slicewarp._runs_along, []
    monkeypatch.setattr(slicewarp, "_runs_along", lambda tensor, dim, *args: (
        passes_along_i.append(tensor.shape) if dim == 3 else None, runs_along(tensor, dim, *args))[1])
    together._build(keys, together._worker_pool(volume.device))
    assert len(passes_along_i) == 5  # the 9 slices across k, 2 at a time, once for the three stacks
    assert not together._planar_volumes
    for key in keys:
        assert torch.equal(together._stacks[key], SliceWarpProjector(volume, np.eye(4))._stack(*key))


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_a_stack_across_j_is_its_twin_across_i_transposed(mode):
    """A straight stack across j whose slab is as long as its filter along i pools the same voxels as the stack
    across i with the same key: built from that one when it is cached, it holds bitwise the re-sliced numbers."""
    volume = torch.from_numpy(np.random.default_rng(4).standard_normal((1, 2, 7, 9, 11)))  # (B, C, K, J, I)
    projector = SliceWarpProjector(volume, np.eye(4))
    for slab, pool_rows in ((2, 1), (3, 2), (4, 1)):
        key = (1, slab, pool_rows, slab, 0, 0, False, mode)
        assert projector._twin_of(key) == (0,) + key[1:]
        projector._build({(0,) + key[1:]}, None)
        assert torch.equal(projector._stack(*key), projector._reslice(*key[:7], mode=mode))
    assert projector._twin_of((1, 3, 1, 2, 0, 0, False, "sum")) is None  # slab and filter differ: scaled differently
    assert projector._twin_of((0, 2, 1, 2, 0, 0, False, "sum")) is None
    assert SliceWarpProjector(volume, np.eye(4), merge_slabs=True)._twin_of((1, 4, 1, 4, 0, 0, False, "sum")) is None


def test_argmax_of_three_is_numpys_first_on_ties():
    values = np.random.default_rng(6).integers(0, 3, (3, 40, 50)).astype(float)  # many ties
    np.testing.assert_array_equal(slicewarp._argmax_of_three(values), np.argmax(values, axis=0))


def test_a_view_takes_the_longest_allowed_slab_length(sphere):
    """`slab_lengths` leaves out lengths: a view whose rays allow 5 slices per slab takes 4, with 8 allowed."""
    volume, affine = sphere
    projector = SliceWarpProjector(volume, affine)
    limited = SliceWarpProjector(volume, affine, slab_lengths=(2, 3, 4, 6, 8))
    drift = projector.max_drift_voxels / 5.5  # rays that allow 5 slices per slab
    assert (projector._slab_length(drift, 0), limited._slab_length(drift, 0)) == (5, 4)
    assert limited._slab_length(projector.max_drift_voxels / 0.5, 0) == 1  # 1 is always allowed
    assert limited._slab_length(1e-9, 0) == 8


def test_half_precision_stacks_keep_the_image_to_their_rounding(sphere):
    """Stacks cached in float16 are sampled in the volume's float32: the image moves by about their rounding."""
    volume, affine = sphere
    views = [CArm(detector=Detector.square(32, 4.0)).view(angle, tilt) for angle, tilt in ((0, 0), (40, 20))]
    half = SliceWarpProjector(volume, affine, stack_dtype=torch.float16)
    image = half.project(views)
    assert image.dtype == torch.float32 and {stack.dtype for stack in half._stacks.values()} == {torch.float16}
    exact = SliceWarpProjector(volume, affine).project(views)
    assert 0 < torch.linalg.norm(image - exact) / torch.linalg.norm(exact) < 1e-3


def bilinear_or_zero(slices, index, channel, row, col):
    """slices (N, C, rows, cols) at slice `index`, bilinear in-plane; zero outside."""
    if index >= len(slices):
        return 0.0
    total = 0.0
    for r in (int(np.floor(row)), int(np.floor(row)) + 1):
        for c in (int(np.floor(col)), int(np.floor(col)) + 1):
            weight = max(0.0, 1 - abs(row - r)) * max(0.0, 1 - abs(col - c))
            if weight and 0 <= r < slices.shape[2] and 0 <= c < slices.shape[3]:
                total += weight * slices[index, channel, r, c]
    return total


@pytest.mark.parametrize("mode", ["sum", "max"])
@pytest.mark.parametrize("rounded", [False, True])
def test_sheared_slabs_shift_each_slice_along_the_shear(mode, rounded):
    """A sheared slab is the sum (or maximum) of its slices, each shifted by its offset from the slab's centre times
    the shear, linearly between whole voxels (or rounded to the nearest, half to even), with zeros outside the
    volume; the stack is padded by the largest shift. Checked against a direct sum over voxels in numpy, for every
    main axis."""
    volume = np.random.default_rng(7).standard_normal((1, 2, 7, 9, 11))  # (B, C, K, J, I), negative values too
    projector = SliceWarpProjector(torch.from_numpy(volume), np.eye(4))
    for main, slab, shear_rows, shear_cols in ((0, 3, 2, -5), (1, 4, -3, 0), (2, 2, 0, 6)):
        (row_dim, col_dim), main_dim = slicewarp._SLICE_LAYOUT[main][0], slicewarp._MAIN_DIM[main]
        slices = np.moveaxis(volume[0], (main_dim - 1, row_dim - 1, col_dim - 1), (0, 2, 3))  # (N, C, rows, cols)
        slope_rows, slope_cols = shear_rows * slicewarp.SHEAR_STEP, shear_cols * slicewarp.SHEAR_STEP
        pad_rows = int(np.ceil(abs((slab - 1) / 2 * slope_rows) - 1e-9))
        pad_cols = int(np.ceil(abs((slab - 1) / 2 * slope_cols) - 1e-9))
        n_slabs, rows, cols = -(-len(slices) // slab), slices.shape[2], slices.shape[3]
        expected = np.zeros((n_slabs, 2, rows + 2 * pad_rows, cols + 2 * pad_cols))
        for n, channel, row, col in np.ndindex(*expected.shape):
            offsets = np.arange(slab) - (slab - 1) / 2  # each slice from its slab's centre
            shifts = [(np.round(offset * slope_rows), np.round(offset * slope_cols)) if rounded
                      else (offset * slope_rows, offset * slope_cols) for offset in offsets]
            samples = [bilinear_or_zero(slices, n * slab + t, channel, row - pad_rows + shift_rows,
                                        col - pad_cols + shift_cols)
                       for t, (shift_rows, shift_cols) in enumerate(shifts)]
            expected[n, channel, row, col] = sum(samples) if mode == "sum" else max(samples)
        stack = projector._reslice(main, slab, 1, 1, shear_rows, shear_cols, rounded, mode)
        np.testing.assert_allclose(stack.numpy(), expected, atol=1e-12)


def test_workers_give_the_same_image_and_restore_torch_threads(sphere):
    """Chunk groups projected by two single-threaded workers add up to bitwise the one-thread image; torch's
    thread count is back where it was after the call."""
    volume, affine = sphere
    views = [CArm(detector=Detector.square(160, 0.9)).view(angle, tilt) for angle, tilt in ((0, 0), (40, 20))]
    assert slicewarp._SAMPLES_PER_CHUNK // 160**2 * slicewarp._GROUPS < 64  # every group gets chunks of slabs
    threads = torch.get_num_threads()
    alone = SliceWarpProjector(volume, affine).project(views)
    shared = SliceWarpProjector(volume, affine, workers=2)
    assert torch.equal(shared.project(views), alone)
    assert torch.get_num_threads() == threads
    assert torch.equal(shared.project(views, "max"), SliceWarpProjector(volume, affine).project(views, "max"))
    channels = torch.cat([volume, 2 * volume, volume.flip(2)], dim=1)  # each stack built in parts by channel
    assert torch.equal(SliceWarpProjector(channels, affine, workers=2).project(views),
                       SliceWarpProjector(channels, affine).project(views))


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_skipping_rays_that_miss_a_slab_and_staging_change_nothing(monkeypatch, mode):
    """Each chunk of slabs samples only the detector rectangle that meets it (bounded per slab from the stack's
    corners), from a staged copy, and masks samples past the detector only where a ray of that rectangle ends: the
    exact same sums (and maxima, zeros read outside the volume included) as sampling every ray at every slab, every
    chunk masked."""
    volume = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 2, 30, 34, 38)))  # negative values too
    affine = np.array([[-1.2, 0.1, 0, 20], [0.05, -1.1, 0, 15], [0, 0, 1.6, -30], [0, 0, 0, 1.0]])
    center = affine[:3, :3] @ ((np.array([38, 34, 30]) - 1) / 2) + affine[:3, 3]
    views = [CArm(detector=Detector(48, 40, (1.5, 1.7))).view(-45, 15, center),
             CArm(detector=Detector.square(80, 10.0)).view(45, 0, center),  # wide cone: two main axes
             CArm(40, 15, Detector.square(50, 2.0)).view(110, -10, center),  # source inside the volume
             CArm(beam="parallel", detector=Detector.square(40, 1.5)).view(20, 0, center),
             CArm(detector=Detector.square(40, 0.8)).view(40, 0, center),  # narrow cone: sheared slabs
             CArm(detector=Detector(30, 44, (2.0, 2.0))).view(150, 30, center),  # mirrored columns
             *(CArm(detector=Detector.square(40, 1.5)).view(0, 0, center + [0, shift, 0]) for shift in (-600, 600))]
    rng = np.random.default_rng(11)  # and a few anywhere
    views += [CArm(float(rng.uniform(150, 400)), float(rng.uniform(60, 140)),
                   Detector(int(rng.integers(8, 40)), int(rng.integers(8, 40)), tuple(rng.uniform(1.0, 8.0, 2))),
                   beam=beam).view(float(rng.uniform(-180, 180)), float(rng.uniform(-40, 40)), center)
              for beam in ("cone", "cone", "cone", "parallel")]
    fast = [SliceWarpProjector(volume, affine).project([view], mode) for view in views]
    assert SliceWarpProjector(volume, affine)._plans(views[4])[0].shear_cols != 0

    def every_ray_at_every_slab(starts, steps, n_rows, n_cols, mask):
        everything = np.full(starts[0].shape, 10**9)
        return -everything, everything

    monkeypatch.setattr(slicewarp, "_slabs_hitting_stack", every_ray_at_every_slab)
    monkeypatch.setattr(SliceWarpProjector, "_slab_windows", lambda *args: None)
    monkeypatch.setattr(SliceWarpProjector, "_staged", lambda self, stack, begin, end: stack[begin:end])
    monkeypatch.setattr(slicewarp, "_chunk_reaches_cut", lambda *args: True)
    assert fast[6].abs().max() == 0 and fast[7].abs().max() == 0  # behind the source; past the detector
    for view, image in zip(views, fast):
        torch.testing.assert_close(image, SliceWarpProjector(volume, affine).project([view], mode), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("row_bands", [False, True])
def test_planning_shortcuts_plan_as_every_pixel_would(monkeypatch, row_bands):
    """A view's plans are the same whether the main axis, the rays' direction and each row's slope range are read
    from the detector's corners and row ends (as planned) or from every pixel."""
    volume = torch.zeros(1, 1, 30, 34, 38)
    affine = np.array([[-1.2, 0.1, 0, 20], [0.05, -1.1, 0, 15], [0, 0, 2.4, -30], [0, 0, 0, 1.0]])
    center = affine[:3, :3] @ ((np.array([38, 34, 30]) - 1) / 2) + affine[:3, 3]
    rng = np.random.default_rng(2)
    views = [CArm(float(rng.uniform(150, 900)), float(rng.uniform(60, 140)),
                  Detector(int(rng.integers(8, 60)), int(rng.integers(8, 60)), tuple(rng.uniform(0.5, 8.0, 2))),
                  beam=beam).view(float(rng.uniform(-180, 180)), float(rng.uniform(-40, 40)), center)
             for beam in ["cone"] * 12 + ["parallel"] * 3]
    views += [CArm(detector=Detector.square(80, 10.0)).view(45, 0, center), CArm(40, 15).view(110, -10, center)]

    def plans(view):
        return [(plan.stack_key, plan.rows, plan.cols, None if plan.mask is None else plan.mask.tolist())
                for plan in SliceWarpProjector(volume, affine, row_bands=row_bands)._plans(view)]

    planned = [plans(view) for view in views]
    assert any(len(plan) > 1 for plan in planned)  # split detectors among them
    monkeypatch.setattr(slicewarp, "_dominant_axis", lambda *args: None)
    monkeypatch.setattr(slicewarp, "_one_sign", lambda *args: False)
    monkeypatch.setattr(slicewarp, "_row_ranges", lambda values, mask: (
        np.where(True if mask is None else mask, values, np.inf).min(1),
        np.where(True if mask is None else mask, values, -np.inf).max(1)))
    assert planned == [plans(view) for view in views]


@pytest.mark.parametrize("merge_slabs", [False, True])
def test_nonzero_boxes_hold_every_non_zero_value_of_a_stack(merge_slabs):
    """The boxes found from the volume's slices hold each slab's non-zero values: exactly in straight stacks, and
    within the reach of the slices' shifts in sheared ones; a slab of zeros has an empty box."""
    volume = torch.zeros(2, 1, 30, 34, 38, dtype=torch.float64)
    volume[0, :, 4:9, 20:31, 2:12] = 1.0
    volume[1, :, 11:15, 6:9, 25:33] = -2.0  # the boxes hold every volume's values
    projector = SliceWarpProjector(volume, np.eye(4), merge_slabs=merge_slabs)
    empty = 0
    for key in [(main, slab, pool_rows, pool_cols, shear_rows, shear_cols, rounded)
                for main in range(3) for slab in (1, 4, 7) for pool_rows, pool_cols in ((1, 1), (2, 3))
                for shear_rows, shear_cols, rounded in ((0, 0, False), (3, -2, False), (-5, 1, True))]:
        stack = projector._stack(*key, "sum")  # (slabs, B*C, rows, cols)
        boxes = projector._nonzero_boxes(key)
        reach = [-(-2 * slicewarp._shear_pad(key[1], shear, pool) // pool) for shear, pool in ((key[4], key[2]),
                                                                                             (key[5], key[3]))]
        for box, values in zip(boxes, (stack != 0).any(1)):
            rows, cols = values.any(1).nonzero().flatten(), values.any(0).nonzero().flatten()
            if rows.numel() == 0:
                assert box[0] > box[1] and box[2] > box[3], key
                empty += 1
                continue
            for (low, high), found, slack in zip((box[:2], box[2:]), (rows, cols), reach):
                assert low <= found.min() and found.max() <= high, key
                assert found.min() - low <= slack and high - found.max() <= slack, key
    assert empty > 50  # slabs of zeros among them


def test_rays_that_meet_only_zeros_of_a_slab_are_not_sampled(monkeypatch):
    """A line integral samples each slab only where its rays can read a non-zero value (the slab's box of them, as
    a CT's reconstruction circle leaves its corners zero): the same sums, bit for bit, from fewer samples. A maximum
    reads every slab, whose zeros may be its largest values."""
    volume = torch.zeros(1, 1, 30, 34, 38, dtype=torch.float64)
    volume[..., 8:22, 5:20, 14:30] = torch.from_numpy(np.random.default_rng(6).standard_normal((14, 15, 16)))
    affine = np.array([[-1.2, 0.1, 0, 20], [0.05, -1.1, 0, 15], [0, 0, 1.6, -30], [0, 0, 0, 1.0]])
    center = affine[:3, :3] @ ((np.array([38, 34, 30]) - 1) / 2) + affine[:3, 3]
    views = [CArm(detector=Detector(48, 40, (1.5, 1.7))).view(-45, 15, center),
             CArm(detector=Detector.square(80, 10.0)).view(45, 0, center),  # wide cone: two main axes
             CArm(beam="parallel", detector=Detector.square(40, 1.5)).view(20, 0, center),
             CArm(detector=Detector.square(40, 0.8)).view(40, 0, center)]  # sheared slabs
    points = [0]
    sample = torch.nn.functional.grid_sample

    def counted(input, grid, *args, **kwargs):
        points[0] += grid.shape[:-1].numel()
        return sample(input, grid, *args, **kwargs)

    def whole_stacks(self, key):
        stack = self._stack(*key, "sum")
        return np.tile([0, stack.shape[2] - 1, 0, stack.shape[3] - 1], (stack.shape[0], 1))

    monkeypatch.setattr(torch.nn.functional, "grid_sample", counted)
    images, sampled = [], []
    for boxes in (SliceWarpProjector._nonzero_boxes, whole_stacks):
        monkeypatch.setattr(SliceWarpProjector, "_nonzero_boxes", boxes)
        projector = SliceWarpProjector(volume, affine)
        points[0] = 0
        line_integrals = [projector.project([view]) for view in views]
        sampled.append(points[0])
        images.append(line_integrals + [projector.project([view], "max") for view in views])
    assert sampled[0] < 0.8 * sampled[1]
    assert all(torch.equal(skipped, every) for skipped, every in zip(*images))


def test_chunks_cover_exactly_the_windows_of_their_slabs():
    """Each chunk of slabs samples the smallest rectangle holding the windows of its slabs that rays meet (empty
    windows, low > high, left out), or nothing where no ray meets any of them."""
    rng = np.random.default_rng(4)
    for _ in range(300):
        slabs, size = int(rng.integers(0, 30)), 40
        low, high = rng.integers(-1, size + 1, (2, 2, slabs))  # (rows/columns, slabs)
        empty = rng.random(slabs) < 0.3
        low[:, empty], high[:, empty] = size, -1
        first, chunk = int(rng.integers(0, 5)), int(rng.integers(1, 7))
        expected = []
        for at in range(0, slabs, chunk):
            met = [n for n in range(at, min(at + chunk, slabs)) if all(low[:, n] <= high[:, n])]
            rows, cols = ((slice(min(low[axis, met]), max(high[axis, met]) + 1) for axis in (0, 1)) if met
                          else (None, None))
            expected.append((first + at, first + min(at + chunk, slabs), rows, cols))
        assert slicewarp._chunks_of_slabs(first, chunk, low[0], high[0], low[1], high[1]) == expected


def wide_cone_oblique(primary: float):
    """A noisy sphere (64^3) seen at `primary` deg by a wide cone (filter factor 2: a voxel is 4 SHEAR_STEPs) ->
    a function giving a fresh projector's first plan and its relative L2 error from the dense reference."""
    values, affine = phantoms.sphere((64, 64, 64), 1.5, 40.0)
    noise = torch.from_numpy(np.random.default_rng(0).random((1, 1, 64, 64, 64)))
    volume = torch.nn.functional.avg_pool3d(torch.from_numpy(values)[None, None] * noise, 3, 1, 1)
    view = CArm(detector=Detector.square(48, 6.0)).view(primary, 0)
    exact = reference_projection(volume[0], affine, view, 0.5)[0]

    def plan_and_error():
        projector = SliceWarpProjector(volume, affine)
        image = projector.project([view])[0, 0, 0]
        return projector._plans(view)[0], float(torch.norm(image - exact) / torch.norm(exact))

    return plan_and_error


@pytest.mark.parametrize("primary", [30, 60])
def test_a_wide_cone_oblique_takes_a_whole_voxel_shear_where_it_lengthens_the_slab(monkeypatch, primary):
    """Where a shear to the rays' middle slope would not double the slab, a shear by whole voxels per slice (no
    interpolation of the slices) is taken if it lengthens the slab: fewer samples, and nearer the dense reference."""
    plan_and_error = wide_cone_oblique(primary)
    whole, whole_error = plan_and_error()
    monkeypatch.setattr(slicewarp, "_whole_voxel_shear_and_drift", lambda low, high, pool: (
        0, max(abs(low), abs(high)) / pool))
    monkeypatch.setattr(slicewarp, "_mean_square_offset", straight_only(slicewarp._mean_square_offset))
    straight, straight_error = plan_and_error()
    assert whole.pool_cols == 2 and whole.shear_cols == 4 and straight.shear_cols == 0
    assert whole.slab > straight.slab
    assert whole_error < straight_error


def straight_only(mean_square_offset):
    """`_mean_square_offset` that no rounded shear can match: the straight slab stays."""
    return lambda low, high, pool, shift, slab: mean_square_offset(low, high, pool, shift, slab) if shift == 0 \
        else np.inf


@pytest.mark.parametrize("primary", [20, 25])
def test_a_wide_cone_oblique_takes_a_rounded_shear_where_it_samples_no_further_from_the_rays(monkeypatch, primary):
    """Where neither shear above lengthens the slab, the middle slope's shear with each slice's shift rounded to whole
    voxels is taken in the longest slab that samples no further from the rays than the straight slab (mean square
    offset): fewer samples, and here nearer the dense reference."""
    plan_and_error = wide_cone_oblique(primary)
    rounded, rounded_error = plan_and_error()
    monkeypatch.setattr(slicewarp, "_mean_square_offset", straight_only(slicewarp._mean_square_offset))
    straight, straight_error = plan_and_error()
    assert rounded.rounded and rounded.shear_cols != 0 and not straight.rounded and straight.shear_cols == 0
    assert rounded.slab > straight.slab
    assert rounded_error < straight_error


def test_the_mean_square_offset_of_slabs():
    """Rays of one slope through a straight slab of L slices: slope^2 (L^2 - 1) / 12 filtered voxels^2; a shear
    that follows them exactly in whole voxels: 0; the worse of two slopes counts."""
    assert slicewarp._mean_square_offset(0.5, 0.5, 1, 0.0, 4) == pytest.approx(0.25 * 15 / 12)
    assert slicewarp._mean_square_offset(2.0, 2.0, 2, 2.0, 5) == 0.0
    assert slicewarp._mean_square_offset(-0.5, 0.2, 1, 0.0, 3) == pytest.approx(0.25 * 8 / 12)


def test_a_chunk_takes_a_few_slabs_however_few_rays_it_has(sphere, monkeypatch):
    """A region of a few pixels would fit its whole stack in one chunk of samples, whose staged copy no cache holds:
    chunks stop at `_MAX_SLABS_PER_CHUNK` slabs."""
    volume, affine = sphere
    slabs = []
    staged = SliceWarpProjector._staged
    monkeypatch.setattr(SliceWarpProjector, "_staged",
                        lambda self, stack, begin, end: slabs.append(end - begin) or staged(self, stack, begin, end))
    view = CArm(detector=Detector(2, 3, (1.0, 1.0))).view(0, 0)
    SliceWarpProjector(volume, affine, antialias=False).project([view])  # 64 slabs of one slice
    assert len(slabs) > 1 and max(slabs) == slicewarp._MAX_SLABS_PER_CHUNK


def test_maximum_intensity_projection(sphere):
    volume, affine = sphere
    view = CArm(detector=Detector.square(32, 4.0)).view(0, 0)
    mip = project(volume * 3.0, affine, [view], mode="max")[0, 0, 0]
    assert mip.max() == pytest.approx(3.0, rel=1e-5) and mip.min() == 0.0


def test_xraysyn_backprojection_returns_a_uniform_value():
    shape = (24, 24, 24)
    affine = phantoms.grid_affine(shape, 2.0)
    volume = torch.full((1, 1, *shape), 0.5, dtype=torch.float64)
    view = CArm(detector=Detector.square(48, 3.0)).view(0, 0)
    image = project(volume, affine, [view], antialias=False)[:, 0]  # (1, 1, H, W)
    spread = backproject_view(image, view, affine, shape)
    core = spread[0, 0, 4:-4, 4:-4, 4:-4]  # voxels whose rays lie well inside the detector and the volume
    torch.testing.assert_close(core, torch.full_like(core, 0.5), rtol=0.02, atol=0)


def test_xraysyn_backprojection_spreads_a_pixel_along_its_ray():
    shape = (32, 32, 32)
    affine = phantoms.grid_affine(shape, 2.0)
    view = CArm(detector=Detector.square(32, 4.0)).view(30, 0)
    image = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    image[0, 0, 16, 10] = 1.0
    spread = backproject_view(image, view, affine, shape)[0, 0].numpy()
    k, j, i = np.nonzero(spread > 0.5 * spread.max())
    points = np.stack([i, j, k, np.ones_like(i)], -1) @ affine.T
    pixels = view.project_points(points[:, :3])
    assert len(i) > 10  # a line of voxels, not a point
    np.testing.assert_allclose(pixels, np.tile([10, 16], (len(i), 1)), atol=0.75)


@pytest.mark.parametrize("beam", ["cone", "parallel"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("row_bands", [False, True])
def test_a_batch_of_views_gives_each_views_own_image(beam, antialias, row_bands, monkeypatch):
    """The batched path (planning on the device, every ray through every slab of its stack) against the per-view
    path: wide-cone obliques split by main axis, tilts, a sheared slab, a detector and a source inside the volume,
    views aimed beside it; with bands of rows too (bands of 4 rows here, so that this small detector has some)."""
    monkeypatch.setattr(slicewarp, "_MIN_BAND_ROWS", 4)
    rng = np.random.default_rng(5)
    volumes = torch.nn.functional.avg_pool3d(torch.from_numpy(rng.random((2, 2, 30, 34, 38))), 3, 1, 1).float()
    affine = np.array([[-1.2, 0.1, 0, 20], [0.05, -1.1, 0, 15], [0, 0, 1.6, -30], [0, 0, 0, 1.0]])
    center = affine[:3, :3] @ ((np.array([38, 34, 30]) - 1) / 2) + affine[:3, 3]
    detector = Detector(40, 36, (8.0, 7.0))
    wide, narrow = CArm(400, 200, detector, beam=beam), CArm(detector=Detector(40, 36, (1.0, 1.0)))
    views = [wide.view(*angles, center) for angles in ((0, 0), (45, 0), (-30, 20), (100, -15), (180, 5), (30, 70))]
    views.append(CArm(100, 90, detector, beam=beam).view(20, 0, center))  # the detector inside the volume
    views.append(CArm(60, 10, detector, beam=beam).view(-20, 5, center))  # the source inside
    views.append(CArm(60, 5, detector, beam=beam).view(20, 10, center))  # an axis crossed both ways, two stacks
    views += [wide.view(0, 0, center + offset) for offset in ([150, 0, 0], [0, 40, 130])]  # aimed beside it
    sheared = narrow.view(40, 10, center)
    batched = SliceWarpProjector(volumes, affine, antialias=antialias, batched=True, row_bands=row_bands)
    one_by_one = SliceWarpProjector(volumes, affine, antialias=antialias, batched=False, row_bands=row_bands)
    keys = {plan.stack_key for view in views for plan in one_by_one._plans(view)}
    assert {key[0] for key in keys} == {0, 1, 2} and (not antialias or {key[1] for key in keys} != {1})
    regions = sum(len(SliceWarpProjector(volumes, affine, antialias=antialias)._plans(view)) for view in views)
    banded = row_bands and antialias and beam == "cone"  # a parallel beam's rays share one slope
    assert (sum(len(one_by_one._plans(view)) for view in views) > regions) == banded
    for group in (views, [sheared, narrow.view(-70, 0, center)]):
        expected = torch.cat([one_by_one.project([view]) for view in group], 1)  # (B, P, C, H, W)
        images = batched.project(group)
        assert images.shape == expected.shape == (2, len(group), 2, 36, 40)
        torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert any(plan.stack_key[4:6] != (0, 0) for plan in batched._plans(sheared)) == antialias


def test_a_batch_of_views_is_differentiable():
    affine = phantoms.grid_affine((4, 5, 6), 3.0)
    views = [CArm(detector=Detector(5, 4, (5.0, 5.0))).view(a, 10) for a in (20, 60, -45)]
    volume = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: SliceWarpProjector(v, affine, batched=True).project(views), (volume,))


def test_row_bands_take_the_slab_their_own_rays_allow(monkeypatch):
    """`row_bands=True`: each band of a tilted view's rows takes the longest slab its own rays allow (drift within
    `max_drift_voxels`), most of them longer than the region's one slab; rows of the region's slab keep their values,
    and a view whose rows all allow one slab is unchanged."""
    monkeypatch.setattr(slicewarp, "_MIN_BAND_ROWS", 1)  # every run of rows its own band
    rng = np.random.default_rng(6)
    shape = (40, 48, 48)
    volume = torch.nn.functional.avg_pool3d(torch.from_numpy(rng.random((1, 1, *shape))), 3, 1, 1).float()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # slices twice as thick as the in-plane voxels, as in many CTs
    affine[:3, 3] = -np.array([47.0, 47.0, 78.0]) / 2
    carm = CArm(400, 200, Detector.square(64, 6.0))  # a cone of +-26 deg
    banded = SliceWarpProjector(volume, affine, row_bands=True, shear=False)
    regions = SliceWarpProjector(volume, affine, shear=False)
    tilted = carm.view(0, 20)
    plans = banded._plans(tilted)
    slab_of_region = {plan.main: plan.slab for plan in regions._plans(tilted)}
    assert len(plans) > len(slab_of_region)
    for plan in plans:
        row_axis, col_axis = slicewarp._SLICE_LAYOUT[plan.main][1]
        slope = [np.abs(plan.slope[axis]) if plan.mask is None else np.abs(plan.slope[axis])[plan.mask]
                 for axis in (row_axis, col_axis)]
        drift = max(slope[0].max() / plan.pool_rows, slope[1].max() / plan.pool_cols)  # filtered voxels per slice
        assert plan.slab == banded._slab_length(drift, plan.main) >= slab_of_region[plan.main]
        assert drift * plan.slab <= banded.max_drift_voxels
    assert sum(plan.slab > slab_of_region[plan.main] for plan in plans) >= len(plans) // 2
    image, reference = banded.project([tilted])[0, 0, 0], regions.project([tilted])[0, 0, 0]
    for plan in plans:
        if plan.slab == slab_of_region[plan.main]:
            rows = image[plan.rows, plan.cols] if plan.mask is None else image[plan.rows, plan.cols][plan.mask]
            same = reference[plan.rows, plan.cols] if plan.mask is None else reference[plan.rows, plan.cols][plan.mask]
            torch.testing.assert_close(rows, same, rtol=1e-5, atol=1e-5)
    level = carm.view(30, 0)
    assert [plan.stack_key for plan in banded._plans(level)] == [plan.stack_key for plan in regions._plans(level)]
    assert torch.equal(banded.project([level]), regions.project([level]))


def test_rays_are_counted_across_the_axis_they_advance_most_filtered_voxels_along(monkeypatch):
    """Slices twice as thick as the pixels, filtered 3x3 in-plane and not across them: a tilted view's steep rays are
    counted across the slices (k) before they are most aligned with k in voxels. No ray then advances more filtered
    voxels along another axis than across its main axis, and the view takes fewer samples than with the rule counted
    in voxels. Its steep rays are then filtered across 3x3 voxels as a level view's are: the tilted view's accuracy
    against the dense reference becomes a level view's at this pitch (counted in voxels, the thin slices left its
    steep rays sharper than the detector's pitch asks)."""
    rng = np.random.default_rng(7)
    volume = torch.nn.functional.avg_pool3d(torch.from_numpy(rng.random((1, 1, 40, 48, 48))), 3, 1, 1).float()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = -np.array([47.0, 47.0, 78.0]) / 2
    view = CArm(400, 200, Detector.square(64, 6.0)).view(45, 30)
    filtered, voxels = SliceWarpProjector(volume, affine, shear=False), SliceWarpProjector(volume, affine, shear=False)
    monkeypatch.setattr(voxels, "_filtered_voxels_per_voxel", lambda pitch_mm: np.ones(3))
    per_voxel = filtered._filtered_voxels_per_voxel(filtered._detector_pitch_at_volume(view))
    assert per_voxel.tolist() == [1 / 3, 1 / 3, 1.0]

    def largest_advance_beside_main(projector):  # filtered voxels along another axis per filtered voxel across main
        return max(float((np.abs(plan.slope) * per_voxel[:, None, None]).max(0)[plan.mask].max()) / per_voxel[plan.main]
                   for plan in projector._plans(view))

    assert largest_advance_beside_main(filtered) <= 1.0 < largest_advance_beside_main(voxels)
    counted = []  # grid points of every sampling call

    def counting_grid_sample(stack, grid, _sample=torch.nn.functional.grid_sample, **options):
        counted.append(grid[..., 0].numel())
        return _sample(stack, grid, **options)

    monkeypatch.setattr(slicewarp.F, "grid_sample", counting_grid_sample)
    samples = {}
    for name, projector in (("filtered", filtered), ("voxels", voxels)):
        counted.clear()
        samples[name] = (projector.project([view])[0, 0, 0], sum(counted))
    assert samples["filtered"][1] < 0.9 * samples["voxels"][1]

    def error(image, at):  # relative L2 from the dense reference
        exact = reference_projection(volume[0], affine, at, step_mm=0.25)[0]
        return float(torch.norm(image - exact) / torch.norm(exact))

    errors = {name: error(image, view) for name, (image, _) in samples.items()}
    level = CArm(400, 200, Detector.square(64, 6.0)).view(45, 0)  # the same pitch: the filter's own accuracy
    assert errors["voxels"] < errors["filtered"] < 1.05 * error(filtered.project([level])[0, 0, 0], level) < 0.03


def test_small_runs_of_rows_join_the_neighbour_that_costs_least():
    """[first row, rows, slab] runs: one of fewer than _MIN_BAND_ROWS (16) rows joins the neighbour whose samples grow
    least, at the shorter slab of the two; runs that come to share a slab become one."""
    runs = [[0, 8, 2], [8, 37, 3], [45, 211, 4]]
    slicewarp._join_small_runs(runs)
    assert runs == [[0, 45, 2], [45, 211, 4]]
    runs = [[0, 100, 4], [100, 10, 2], [110, 20, 6], [130, 120, 4]]
    slicewarp._join_small_runs(runs)  # 10 rows of 2 join the 20 of 6 (fewer samples added than with 100 of 4)
    assert runs == [[0, 100, 4], [100, 30, 2], [130, 120, 4]]
    runs = [[0, 50, 4], [50, 5, 6], [55, 60, 4]]
    slicewarp._join_small_runs(runs)
    assert runs == [[0, 115, 4]]
