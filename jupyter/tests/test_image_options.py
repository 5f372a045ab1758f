"""A Jupyter service's image is refused when it begins with '-': the worker hands it to
docker/podman, which would take it as one of their options."""

import pytest

from jupyter.models import JupyterService

pytestmark = pytest.mark.django_db

URL = "/v1/jupyter/services"


@pytest.mark.parametrize("image", ["--privileged", "-v/:/host", "--volume=/:/host", "-"])
def test_an_image_that_begins_with_a_dash_is_refused_with_422_naming_image(user_client, image):
    response = user_client.post(URL, {"name": "nb", "image": image}, format="json")
    assert response.status_code == 422, response.content
    body = response.json()
    assert [detail["field"] for detail in body["details"]] == ["image"]
    assert "Must not begin with '-'." in str(body["details"])
    assert not JupyterService.objects.exists()


@pytest.mark.parametrize("image", ["quay.io/jupyter/base-notebook", "jupyter/pytorch:latest", "my-image:2-cuda"])
def test_an_image_with_a_dash_inside_is_accepted(user_client, image):
    response = user_client.post(URL, {"name": "nb", "image": image}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["image"] == image
