-- Shadow rules (HOLDCLEAR_RULES_SHADOW_FILE): each decision made while a
-- shadow rules file is loaded writes a `shadow` line in the case's history
-- (what the rules in force decided and what the shadow rules would have).
-- `holdclear rules diff --shadow --since …` reads those lines by time.
CREATE INDEX case_history_shadow ON case_history (at) WHERE kind = 'shadow';
