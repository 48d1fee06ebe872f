-- One order, one case, whatever id names it.
--
-- An order may be announced by its web order id first and by its sales order
-- number later (or the other way round). The database keeps at most one open
-- case per sales order number and at most one per web order id, and the
-- order key is always derived from the ids the case knows, so a case found by
-- either id is the order's only open case. A case that learns a sales order
-- number another open case already has is joined into that case and ends in
-- the terminal state `merged` (`merged_into` names the case it joined).

ALTER TABLE cases ADD COLUMN merged_into uuid REFERENCES cases (id);

ALTER TABLE cases DROP CONSTRAINT cases_state_known;
ALTER TABLE cases ADD CONSTRAINT cases_state_known
    CHECK (state IN ('deciding', 'resolving', 'assigning', 'watching', 'released', 'escalated', 'merged'));

-- Before the indexes: open cases of one order written by an earlier version
-- (the same sales order number learned by a web-order case, or the same web
-- order id) are merged into the oldest of them.
WITH open_cases AS (
    SELECT id, sales_order_number AS so, web_order_id AS web, created_at
    FROM cases WHERE state NOT IN ('released', 'escalated')
),
dups AS (
    SELECT o.id,
           (SELECT k.id FROM open_cases k
            WHERE (k.so = o.so OR k.web = o.web) AND (k.created_at, k.id) < (o.created_at, o.id)
            ORDER BY k.created_at, k.id LIMIT 1) AS keeper
    FROM open_cases o
),
merged AS (
    UPDATE cases c
    SET state = 'merged', merged_into = d.keeper, closed_at = now(), lease_owner = NULL,
        lease_expires_at = NULL, updated_at = now()
    FROM dups d
    WHERE c.id = d.id AND d.keeper IS NOT NULL
    RETURNING c.id, d.keeper
)
INSERT INTO case_history (case_id, kind, state, detail)
SELECT id, 'merged', 'merged', jsonb_build_object('into', keeper, 'by', 'migration')
FROM merged;

UPDATE cases SET order_key = sales_order_number
WHERE sales_order_number IS NOT NULL AND order_key <> sales_order_number;

-- The order key is the sales order number when known, else 'web:<webOrderId>'.
ALTER TABLE cases ADD CONSTRAINT cases_order_key_is_identity
    CHECK (order_key = coalesce(sales_order_number, 'web:' || web_order_id));

DROP INDEX cases_one_open_per_order;
CREATE UNIQUE INDEX cases_one_open_per_order ON cases (order_key)
    WHERE state NOT IN ('released', 'escalated', 'merged');
CREATE UNIQUE INDEX cases_one_open_per_web_order ON cases (web_order_id)
    WHERE state NOT IN ('released', 'escalated', 'merged');
DROP INDEX cases_due;
CREATE INDEX cases_due ON cases (next_action_at)
    WHERE state NOT IN ('released', 'escalated', 'merged');
CREATE INDEX cases_web_order_id ON cases (web_order_id) WHERE web_order_id IS NOT NULL;
CREATE INDEX cases_merged_into ON cases (merged_into) WHERE merged_into IS NOT NULL;
