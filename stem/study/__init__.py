"""The user study of Table 3, without a web server: pairs of a Table 2 sweep and their manifest (`pairs`), each
participant's blinded sample (`sampling`), answers in SQLite (`store`) and Table 3 from them (`table3`).
pairs <- sampling <- store <- table3, never the other way round (docs/STUDY.md)."""
