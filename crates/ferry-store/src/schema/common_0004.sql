CREATE INDEX migrations_created ON migrations (created_at, id);
CREATE INDEX migrations_state_created ON migrations (state, created_at, id);
CREATE INDEX workloads_group_name ON workloads (move_group_id, name);
