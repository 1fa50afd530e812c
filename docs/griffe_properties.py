"""A Griffe extension for the API reference (mkdocs.yml, mkdocstrings ``extensions:``).

`DaliShareIterator` defines most of its properties in one line each,
``device = property(lambda self: ..., doc="Where batches go ...")``. Griffe reads the source without
running it, so it sees an attribute with no docstring; this extension gives such an attribute the
``doc=`` text as its docstring and the ``property`` label, as ``help()`` shows them.
"""

from __future__ import annotations

import ast

import griffe


class PropertyDocs(griffe.Extension):
    """Docstrings of ``name = property(getter, doc="...")`` class attributes."""

    def on_attribute_instance(self, *, node, attr: griffe.Attribute, **kwargs) -> None:
        """Take the ``doc=`` of a ``property(...)`` call assigned to a class attribute."""
        if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Call):
            return
        call = node.value
        if not (isinstance(call.func, ast.Name) and call.func.id == "property"):
            return
        attr.labels.discard("instance-attribute")
        attr.labels.discard("class-attribute")
        attr.labels.add("property")
        attr.value = None  # the getter's lambda says nothing to a reader
        for keyword in call.keywords:
            if keyword.arg == "doc" and isinstance(keyword.value, ast.Constant) and isinstance(keyword.value.value, str):
                attr.docstring = griffe.Docstring(keyword.value.value, lineno=keyword.value.lineno,
                                                  endlineno=keyword.value.end_lineno, parent=attr)
