from stem.reporting.display import display_column, display_value


def test_stem_rows_name_k_from_the_run():
    # bug caught: a preset name shown with the preset's K when the run overrode num_bases
    assert display_value("inversion", "stem", {"inversion": {"method": "stem", "num_bases": 128}}) == "STEM (K=128)"
    assert display_value("inversion", "stem_k512") == "STEM (K=512)"
    assert display_value("inversion", "stem_literal", {"inversion": {"method": "stem", "num_bases": 256}}) \
        == "STEM, Eq. 8-11 literal (K=256)"

def test_same_config_name_differs_by_column():
    # bug caught: one flat map, so the FateZero *inversion* is called the FateZero edit
    assert display_value("inversion", "fatezero") != display_value("table2", "fatezero")
    assert display_value("inversion", "ddim_1frame") == "DDIM 1-frame"

def test_unknown_values_and_columns_pass_through():
    assert display_value("data.n_frames", 120) == "120"
    assert display_value("inversion", True) == "true"
    assert display_column("data.n_frames") == "Frames N" and display_column("seed") == "seed"


def test_run_method_names_of_2frame_runs():
    # bug caught: a run's own method name ("ddim_2frame_fatezero", the pairing appended) shown raw in titles
    assert display_value("inversion", "ddim_2frame_fatezero") == display_value("inversion", "ddim_2frame")
