#!/bin/sh
# First start of the compose PostgreSQL: a role and database for the modelfactory run catalog
# (the catalog's schema is created by `modelfactory catalog upgrade` / the first run).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE modelfactory LOGIN PASSWORD '${CATALOG_PASSWORD}';
CREATE DATABASE modelfactory OWNER modelfactory;
SQL
