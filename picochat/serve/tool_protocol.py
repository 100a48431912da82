"""The typed schemas of tools, tool calls and answer shapes in OpenAI's chat API: what a request may hold
(`tools`, `tool_choice`, `response_format`, an assistant's `tool_calls`, a `tool` message's id) and what
a reply sends back (`tool_calls`, whole or as stream deltas). protocol.py's requests and responses use them.

A tool's parameters and a response_format's schema are checked here for shape and size (an object
schema, within grammar.py's limits); whether the grammar engine can enforce them is checked when they are
compiled (openai.py), so every problem is a 400 naming its field before anything reaches the engine.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine.grammar import schema_problem

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"   # OpenAI's rule for function and schema names
MAX_TOOLS = 128                            # OpenAI's limit
MAX_DESCRIPTION_CHARS = 8192
MAX_ARGUMENTS_CHARS = 100_000              # a past call's arguments, as the client sends them back
MAX_CALL_ID_CHARS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _object_schema(schema: dict | None) -> dict | None:
    """A tool's parameters: a JSON schema of an object, within the size and depth limits."""
    if schema is None:
        return None
    problem = schema_problem(schema)
    if problem:
        raise ValueError(problem)
    kind = schema.get("type", "object")
    if kind != "object":
        raise ValueError(f"must be a JSON schema of an object (type 'object'), not of {kind!r}")
    return schema


# ----------------------------------------------------------------------------- in a request
class FunctionDef(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION_CHARS)] = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, parameters):
        return _object_schema(parameters)


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: Annotated[str, Field(max_length=64)]


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaFormat(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _limits(cls, schema):
        problem = schema_problem(schema) if schema is not None else None
        if problem:
            raise ValueError(problem)
        return schema


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object: {name, schema, strict}")
        return self


class FunctionCall(_Strict):
    name: Annotated[str, Field(max_length=64)]
    arguments: Annotated[str, Field(max_length=MAX_ARGUMENTS_CHARS)]


class ToolCallIn(_Strict):
    """A call the assistant made earlier in the conversation, sent back by the client."""
    id: Annotated[str, Field(max_length=MAX_CALL_ID_CHARS)]
    type: Literal["function"] = "function"
    function: FunctionCall


# ----------------------------------------------------------------------------- in a reply
def omitted_if_none():
    """A field OpenAI leaves out of the JSON when it has no value (no key at all, rather than null)."""
    return Field(None, exclude_if=lambda value: value is None)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class FunctionDelta(_Response):
    name: str | None = omitted_if_none()
    arguments: str = ""


class ToolCallDeltaOut(_Response):
    """One piece of a streamed call: index, id, type and name on its first delta; then argument pieces."""
    index: int
    id: str | None = omitted_if_none()
    type: Literal["function"] | None = omitted_if_none()
    function: FunctionDelta
