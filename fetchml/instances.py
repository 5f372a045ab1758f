"""Model instances built without `Model.__init__`'s walk over every field, for hot paths.

`Model.__init__` visits each field of the model whatever was given (about
10 to 30 microseconds for the task and assignment models); a dispatch round
and a batch of run reports build hundreds of instances. Where Django would
do no more than set attributes (no `__init__` or `from_db` of the model's
own, nothing listening to its init signals), these set them directly;
otherwise they call Django.
"""

from collections.abc import Callable
from typing import Any

from django.db.models import Model
from django.db.models.base import ModelState
from django.db.models.signals import post_init, pre_init


def _built_plainly(model: type[Model]) -> bool:
    return (
        model.from_db.__func__ is Model.from_db.__func__
        and model.__init__ is Model.__init__
        and not pre_init.has_listeners(model)
        and not post_init.has_listeners(model)
    )


def instance_builder(model: type[Model]) -> Callable[[type[Model], str, list[str], list[Any]], Model]:
    """`Model.from_db`'s equal for `model`, called as `build(model, db, field_names, values)`."""
    return _loaded if _built_plainly(model) else _loaded_by_django


def _loaded(model: type[Model], db: str, field_names: list[str], values: list[Any]) -> Model:
    """An instance as `Model.from_db` makes it: the fields not loaded are deferred (absent from the
    instance's `__dict__`, as `__init__` leaves them)."""
    instance = model.__new__(model)
    state = instance._state = ModelState()
    state.adding, state.db = False, db
    instance.__dict__.update(zip(field_names, values, strict=True))
    return instance


def _loaded_by_django(model: type[Model], db: str, field_names: list[str], values: list[Any]) -> Model:
    return model.from_db(db, field_names, values)


def unsaved(model: type[Model], **values: Any) -> Model:
    """`model(**values)` for values given by attribute name (`task_id`, not `task`): every other
    field takes its default."""
    if not _built_plainly(model):
        return model(**values)
    fields = _fields_by_attname(model)
    unknown = values.keys() - fields.keys()
    if unknown:
        raise TypeError(f"{model.__name__} has no field {sorted(unknown)[0]!r}")
    instance = model.__new__(model)
    instance._state = ModelState()
    attributes = instance.__dict__
    for attname, field in fields.items():
        attributes[attname] = values[attname] if attname in values else field.get_default()
    return instance


_fields: dict[type[Model], dict[str, Any]] = {}


def _fields_by_attname(model: type[Model]) -> dict[str, Any]:
    if model not in _fields:
        _fields[model] = {field.attname: field for field in model._meta.concrete_fields}
    return _fields[model]
