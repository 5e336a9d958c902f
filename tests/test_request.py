"""The one place that checks click requests: every malformed parameter a careless or hostile
client can send is refused with a message naming it; good values are typed as the engines take them."""

import math

import pytest

from samlabel.errors import InputError
from samlabel.request import MAX_CLICKS, ClickRequest, parse_click_request, result_options


def test_slicer_request_is_typed():
    request = parse_click_request({"foreground": [[1, 2, 3.0]], "background": [[4, 5, 6]], "client_id": "slicer-1",
                                   "label": "liver", "reset_state": "true", "uncertainty": "True", "ensemble_size": "16",
                                   "slice": "7", "roi": [1, 2, 3, 4, 7, 7]})
    assert request == ClickRequest(foreground=((1.0, 2.0, 3.0),), background=((4.0, 5.0, 6.0),), client="slicer-1",
                                   label="liver", reset=True, ensemble_size=16, slice_index=7,
                                   roi=(1.0, 2.0, 3.0, 4.0, 7.0, 7.0))
    assert request.interaction_key("image.nii.gz") == ("slicer-1", "image.nii.gz", "liver")


def test_ohif_request_without_optional_parameters():
    request = parse_click_request({"foreground": [[1, 2, 3]], "background": [], "result_compress": False})
    assert request == ClickRequest(foreground=((1.0, 2.0, 3.0),))
    assert request.ensemble_size == 0  # no uncertainty asked for: no ensemble, whatever ensemble_size says
    assert parse_click_request({"foreground": [[1, 2, 3]], "ensemble_size": "abc"}).ensemble_size == 0


@pytest.mark.parametrize("params,names", [
    ({"foreground": [[math.inf, 1, 1]]}, "foreground"),
    ({"foreground": [[math.nan, 1, 1]]}, "foreground"),
    ({"foreground": 5}, "foreground"),
    ({"background": "1,2,3"}, "background"),
    ({"foreground": [[1, 2]]}, "three voxel indices"),
    ({"foreground": [[1, 2, 3, 4]]}, "three voxel indices"),
    ({"foreground": [["a", 1, 1]]}, "three voxel indices"),
    ({"foreground": [[True, 1, 1]]}, "three voxel indices"),
    ({"foreground": [[1, 1, 1]] * (MAX_CLICKS + 1)}, "at most"),
    ({"client_id": ["a"]}, "client_id"),
    ({"client_id": {"a": 1}}, "client_id"),
    ({"client_id": "x" * 1000}, "client_id"),
    ({"label": ["segment"]}, "label"),
    ({"reset_state": "maybe"}, "reset_state"),
    ({"uncertainty": "maybe"}, "uncertainty"),
    ({"uncertainty": True, "ensemble_size": "abc"}, "ensemble_size"),
    ({"uncertainty": True, "ensemble_size": 0}, "ensemble_size"),
    ({"uncertainty": True, "ensemble_size": 10**6}, "ensemble_size"),
    ({"slice": "abc"}, "slice"),
    ({"slice": "40.0"}, "slice"),
    ({"slice": [40]}, "slice"),
    ({"slice": 40.0}, "slice"),
    ({"slice": -1}, "slice"),
    ({"roi": [1, 2, 3]}, "roi"),
    ({"roi": [1, 2, 3, 4, 5, math.nan]}, "roi"),
    ({"roi": "1,2,3,4,5,6"}, "roi"),
])
def test_malformed_parameters_are_refused_by_name(params, names):
    with pytest.raises(InputError, match=names):
        parse_click_request({"foreground": [[1, 1, 1]], **params})


def test_result_options():
    assert result_options({}) == (None, None, True)
    assert result_options({"result_extension": ".nrrd", "result_dtype": "uint16", "result_compress": "false"}) == (
        ".nrrd", "uint16", False)
    for params, name in (({"result_dtype": "complex128"}, "result_dtype"), ({"result_dtype": ["uint8"]}, "result_dtype"),
                         ({"result_extension": "../x.nrrd"}, "result_extension"), ({"result_compress": "maybe"}, "result_compress")):
        with pytest.raises(InputError, match=name):
            result_options(params)
