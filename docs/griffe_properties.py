"""A Griffe extension for the API reference (mkdocs.yml, mkdocstrings ``extensions:``).

`DaliShareIterator` defines most of its properties in one line each,
``device = _shown("_options.device", "Where batches go ...")`` (a ``property`` over an attribute path)
or ``property(lambda self: ..., doc="...")``. Griffe reads the source without running it, so it sees
an attribute with no docstring; this extension gives such an attribute that text as its docstring and
the ``property`` label, as ``help()`` shows them.
"""

from __future__ import annotations

import ast

import griffe


class PropertyDocs(griffe.Extension):
    """Docstrings of ``name = property(getter, doc="...")`` and ``name = _shown(path, "...")`` class attributes."""

    def on_attribute_instance(self, *, node, attr: griffe.Attribute, **kwargs) -> None:
        """Take the ``doc=`` of a ``property(...)`` call, or the text of a ``_shown(...)`` one, assigned to a class attribute."""
        if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Call):
            return
        call = node.value
        if not (isinstance(call.func, ast.Name) and call.func.id in ("property", "_shown")):
            return
        attr.labels.discard("instance-attribute")
        attr.labels.discard("class-attribute")
        attr.labels.add("property")
        attr.value = None  # the getter's lambda says nothing to a reader
        texts = [k.value for k in call.keywords if k.arg == "doc"]
        texts += call.args[1:2] if call.func.id == "_shown" else []  # _shown(path, doc)
        for text in texts:
            if isinstance(text, ast.Constant) and isinstance(text.value, str):
                attr.docstring = griffe.Docstring(text.value, lineno=text.lineno, endlineno=text.end_lineno, parent=attr)
