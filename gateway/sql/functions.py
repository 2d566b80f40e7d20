"""Which functions lineage runs through (built-ins, an extension's IMMUTABLE C code, the
constructors of a user's range type, a user's LANGUAGE sql function read through its body)
and the catalog queries that tell."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from gateway.sql.facts import ColumnRef, StatementFacts
from gateway.sql.names import Column

# Whether the function `p` computes its result from its arguments alone, so that lineage
# runs through it as through a built-in. Either a member of an extension (code an admin
# installed; CREATE EXTENSION is denied to everyone else), written in C (only a superuser
# creates C functions, so nobody else can swap in a body), and IMMUTABLE: PostgreSQL's
# contract for that is "no database lookups, nothing but the argument list", which rules out
# what makes a function opaque to lineage (running SQL text, reading a cursor, a relation by
# name or a page, another database: dblink, crosstab, get_raw_page, ... are all STABLE or
# VOLATILE). Or a constructor PostgreSQL itself made for a type (CREATE TYPE ... AS RANGE
# makes `r(lower, upper[, bounds])`, `r_multirange(...)` and the cast from the range to its
# multirange): built-in code (LANGUAGE internal, range_constructor2, multirange_constructor1,
# ...) tied to its type by an internal dependency, which no user DDL can make.
# An argument that names what to read (a regclass, an OID, a cursor) keeps it opaque anyway.
_TRACED_FUNCTION = """(
    p.provolatile = 'i'
    AND NOT p.proargtypes::oid[] && ARRAY[
        'pg_catalog.regclass'::regtype, 'pg_catalog.regnamespace'::regtype,
        'pg_catalog.regproc'::regtype, 'pg_catalog.regprocedure'::regtype,
        'pg_catalog.refcursor'::regtype, 'pg_catalog.oid'::regtype]::oid[]
    AND ((p.prolang IN (SELECT l.oid FROM pg_catalog.pg_language l
                        WHERE l.lanname IN ('c', 'internal'))
          AND EXISTS (SELECT 1 FROM pg_catalog.pg_depend e
                      WHERE e.classid = 'pg_catalog.pg_proc'::regclass AND e.objid = p.oid
                        AND e.deptype = 'e'))
         OR (p.prolang = (SELECT l.oid FROM pg_catalog.pg_language l
                          WHERE l.lanname = 'internal')
             AND EXISTS (SELECT 1 FROM pg_catalog.pg_depend e
                         WHERE e.classid = 'pg_catalog.pg_proc'::regclass
                           AND e.objid = p.oid AND e.deptype = 'i'
                           AND e.refclassid = 'pg_catalog.pg_type'::regclass)))
)"""

# Which schemas hold a function of each name, and which of them one that is not traced
# (pg_catalog aside: built-ins are judged by name, see LINEAGE_OPAQUE_BUILTINS).
_FUNCTION_QUERY = f"""
SELECT p.proname::text, array_agg(DISTINCT n.nspname::text),
       coalesce(array_agg(DISTINCT n.nspname::text)
                FILTER (WHERE n.nspname <> 'pg_catalog' AND NOT {_TRACED_FUNCTION}), '{{}}')
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname = ANY($1::text[])
GROUP BY p.proname
"""  # noqa: S608 (constants of this module, no input)

# The functions of each name outside pg_catalog that are not traced, with what it takes to
# read a LANGUAGE sql one's body: its language, kind, source text and the search_path it
# sets for itself (SET search_path = ...), if any.
_UNTRACED_FUNCTION_QUERY = f"""
SELECT p.proname::text, n.nspname::text, l.lanname::text, p.prokind::text, p.prosrc,
       (SELECT substr(c, 13) FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%' LIMIT 1)
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE p.proname = ANY($1::text[]) AND n.nspname <> 'pg_catalog' AND NOT {_TRACED_FUNCTION}
"""  # noqa: S608 (constants of this module, no input)

# How deep calls of LANGUAGE sql functions are followed into their bodies (f calls g calls
# h ...); a call deeper than that stays opaque, as does one that recurses.
_MAX_BODY_DEPTH = 4

# What a LANGUAGE sql function's body may be and still have its lineage traced: reads only
# (a body that writes, locks rows, or runs code of its own is opaque: a human decides).
_TRACEABLE_BODY_FLAGS = frozenset({"multi_statement", "via_view"})

# Which schemas hold an operator of each name whose function someone wrote in SQL or a
# procedural language: not a built-in (pg_catalog) and not part of an extension (whose
# code an admin installed; CREATE EXTENSION is denied to everyone else).
_OPERATOR_QUERY = """
SELECT o.oprname::text, array_agg(DISTINCT n.nspname::text)
FROM pg_catalog.pg_operator o
JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode
WHERE o.oprname = ANY($1::text[])
  AND p.pronamespace <> 'pg_catalog'::regnamespace
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  WHERE d.classid = 'pg_catalog.pg_operator'::regclass AND d.objid = o.oid
                    AND d.deptype = 'e')
GROUP BY o.oprname
"""

# Which schemas hold a type of each name that a cast to it runs user-written code for: a
# domain whose CHECK constraint calls such a function, or a cast with such a function (an
# extension's traced functions aside: `$1::hstore`, `'x'::citext`). I/O conversion and
# binary-coercible casts (castmethod 'i', 'b') have no function and carry their argument.
_TYPE_QUERY = f"""
SELECT t.typname::text, array_agg(DISTINCT n.nspname::text)
FROM pg_catalog.pg_type t
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE t.typname = ANY($1::text[])
  AND (EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
               JOIN pg_catalog.pg_depend d
                 ON d.classid = 'pg_catalog.pg_constraint'::regclass AND d.objid = c.oid
                AND d.refclassid = 'pg_catalog.pg_proc'::regclass
               JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
               WHERE c.contypid = t.oid AND p.pronamespace <> 'pg_catalog'::regnamespace
                 AND NOT {_TRACED_FUNCTION})
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_cast k
                  JOIN pg_catalog.pg_proc p ON p.oid = k.castfunc
                  WHERE k.casttarget = t.oid AND p.pronamespace <> 'pg_catalog'::regnamespace
                    AND NOT {_TRACED_FUNCTION}))
GROUP BY t.typname
"""  # noqa: S608 (constants of this module, no input)

# (schemas holding a function of a name, those of them holding one that is not traced)
_FunctionHolders = tuple[frozenset[str], frozenset[str]]
# An untraced function: schema, language, kind, source text, the search_path it sets.
_UntracedFunction = tuple[str, str, str, str, str | None]


def _with_bodies(facts: StatementFacts, bodies: Sequence[StatementFacts]) -> StatementFacts:
    """`facts` calling LANGUAGE sql functions whose bodies are `bodies` (resolved): what
    they read is read by the statement, every column they use is used under a function
    (usage "expression": an oracle for whoever may not see it) and, in a statement that
    writes, may be copied into what it writes (usage "source"), the functions they call
    are called, and any value of those columns may flow into any output column (which
    output calls which function is not traced here)."""
    usages = ("expression", "source") if facts.writes else ("expression",)
    reads = dict.fromkeys(facts.reads)
    columns = dict.fromkeys(facts.columns)
    functions = dict.fromkeys(facts.functions)
    traced = dict.fromkeys(facts.traced_functions)
    sources: set[Column] = set()
    for body in bodies:
        reads.update(dict.fromkeys(body.reads))
        for c in body.columns:
            for usage in usages:
                columns[ColumnRef(c.schema, c.table, c.column, usage)] = None
            sources.add((c.schema, c.table, c.column))
        functions.update(dict.fromkeys(body.functions))
        traced.update(dict.fromkeys(body.traced_functions))
        for output in body.outputs or ():
            sources.update(output.sources)
    outputs = facts.outputs
    if outputs is not None and sources:
        outputs = tuple(replace(o, sources=o.sources | sources) for o in outputs)
    return replace(
        facts,
        reads=tuple(reads),
        columns=tuple(columns),
        functions=tuple(functions),
        traced_functions=tuple(traced),
        outputs=outputs,
    )
