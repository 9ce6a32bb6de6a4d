"""Storage: the database schema, data access and the export of the votes."""
