-- Runtimes that build fast by default, on the interpreter a pack asks for (issue 13).
--
-- core.python: no pip copied into every environment. With uv on the host, `uv venv` and
-- `uv pip install` (from uv's cache, hard-linked); without it, a pip-less venv that the chosen
-- interpreter's pip installs into (`pip --python`, pip >= 22.3). `{python}` is the interpreter
-- chosen for the pack (its runtime_dependencies, else python3 on PATH).
-- core.nodejs: `npm ci` when the pack has a lockfile, `npm install` otherwise.
--
-- Applied to packenvd's own seeds as the first migration wrote them, and to core.* rows a
-- platform left without installers (an `installers` column it did not have gets '[]'); a
-- platform's own non-empty definition is kept as it is.

CREATE TEMPORARY TABLE packenvd_runtime_defaults (ref TEXT PRIMARY KEY, old JSONB, new JSONB)
    ON COMMIT DROP;

INSERT INTO packenvd_runtime_defaults VALUES
('core.python', $old${
  "installers": [
    {"name": "create venv", "order": 1,
     "command": "python3", "args": ["-m", "venv", "{env_path}"]},
    {"name": "install requirements", "order": 2,
     "condition": {"file_exists": "{pack_path}/requirements.txt"},
     "command": "{env_path}/bin/python",
     "args": ["-m", "pip", "install", "--no-input", "-r", "{pack_path}/requirements.txt"]}
  ],
  "executable_templates": {"python": "{env_path}/bin/python", "pip": "{env_path}/bin/pip"},
  "env_vars": {"VIRTUAL_ENV": "{env_path}"},
  "requires_environment": true
}$old$, $new${
  "interpreter": "python",
  "installers": [
    {"name": "create venv (uv)", "order": 1,
     "condition": {"command_exists": "uv"},
     "command": "uv", "args": ["venv", "--quiet", "--python", "{python}", "{env_path}"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}},
    {"name": "create venv", "order": 1,
     "condition": {"command_missing": "uv"},
     "command": "{python}", "args": ["-m", "venv", "--without-pip", "{env_path}"]},
    {"name": "install requirements (uv)", "order": 2,
     "condition": {"command_exists": "uv", "file_exists": "{pack_path}/requirements.txt"},
     "command": "uv",
     "args": ["pip", "install", "--python", "{env_path}/bin/python", "-r", "{pack_path}/requirements.txt"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}},
    {"name": "install requirements", "order": 2,
     "condition": {"command_missing": "uv", "file_exists": "{pack_path}/requirements.txt"},
     "command": "{python}",
     "args": ["-m", "pip", "--python", "{env_path}/bin/python", "install", "--no-input",
              "--disable-pip-version-check", "-r", "{pack_path}/requirements.txt"]}
  ],
  "executable_templates": {"python": "{env_path}/bin/python"},
  "env_vars": {"VIRTUAL_ENV": "{env_path}"},
  "requires_environment": true
}$new$),
('core.nodejs', $old${
  "installers": [
    {"name": "copy package.json", "order": 1,
     "condition": {"file_exists": "{pack_path}/package.json"},
     "command": "cp", "args": ["{pack_path}/package.json", "{env_path}/package.json"]},
    {"name": "copy package-lock.json", "order": 2,
     "condition": {"file_exists": "{pack_path}/package-lock.json"},
     "command": "cp", "args": ["{pack_path}/package-lock.json", "{env_path}/package-lock.json"]},
    {"name": "npm install", "order": 3, "cwd": "{env_path}",
     "condition": {"file_exists": "{env_path}/package.json"},
     "command": "npm", "args": ["install", "--omit=dev", "--no-audit", "--no-fund"]}
  ],
  "executable_templates": {"node": "node"},
  "env_vars": {"NODE_PATH": "{env_path}/node_modules"},
  "requires_environment": true
}$old$, $new${
  "interpreter": "node",
  "installers": [
    {"name": "copy package.json", "order": 1,
     "condition": {"file_exists": "{pack_path}/package.json"},
     "command": "cp", "args": ["{pack_path}/package.json", "{env_path}/package.json"]},
    {"name": "copy package-lock.json", "order": 2,
     "condition": {"file_exists": "{pack_path}/package-lock.json"},
     "command": "cp", "args": ["{pack_path}/package-lock.json", "{env_path}/package-lock.json"]},
    {"name": "copy npm-shrinkwrap.json", "order": 2,
     "condition": {"file_exists": "{pack_path}/npm-shrinkwrap.json"},
     "command": "cp", "args": ["{pack_path}/npm-shrinkwrap.json", "{env_path}/npm-shrinkwrap.json"]},
    {"name": "npm ci", "order": 3, "cwd": "{env_path}",
     "condition": {"file_exists": ["{env_path}/package.json", "{env_path}/package-lock.json"]},
     "command": "npm", "args": ["ci", "--omit=dev", "--no-audit", "--no-fund"]},
    {"name": "npm ci (shrinkwrap)", "order": 3, "cwd": "{env_path}",
     "condition": {"file_exists": ["{env_path}/package.json", "{env_path}/npm-shrinkwrap.json"],
                   "file_missing": "{env_path}/package-lock.json"},
     "command": "npm", "args": ["ci", "--omit=dev", "--no-audit", "--no-fund"]},
    {"name": "npm install", "order": 3, "cwd": "{env_path}",
     "condition": {"file_exists": "{env_path}/package.json",
                   "file_missing": ["{env_path}/package-lock.json", "{env_path}/npm-shrinkwrap.json"]},
     "command": "npm", "args": ["install", "--omit=dev", "--no-audit", "--no-fund"]}
  ],
  "executable_templates": {"node": "node"},
  "env_vars": {"NODE_PATH": "{env_path}/node_modules"},
  "requires_environment": true
}$new$),
('core.python-uv', NULL, $new${
  "interpreter": "python",
  "installers": [
    {"name": "create venv", "order": 1,
     "command": "uv", "args": ["venv", "--quiet", "--python", "{python}", "{env_path}"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}},
    {"name": "install requirements", "order": 2,
     "condition": {"file_exists": "{pack_path}/requirements.txt"},
     "command": "uv",
     "args": ["pip", "install", "--python", "{env_path}/bin/python", "-r", "{pack_path}/requirements.txt"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}}
  ],
  "executable_templates": {"python": "{env_path}/bin/python"},
  "env_vars": {"VIRTUAL_ENV": "{env_path}"},
  "requires_environment": true
}$new$),
('core.shell', NULL, '{"installers": [], "requires_environment": false}'),
('core.native', NULL, '{"installers": [], "requires_environment": false}');

-- core.python-uv as the first migration wrote it, to be moved to `{python}` like core.python.
UPDATE packenvd_runtime_defaults SET old = $old${
  "installers": [
    {"name": "create venv", "order": 1,
     "command": "uv", "args": ["venv", "--quiet", "--python", "python3", "{env_path}"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}},
    {"name": "install requirements", "order": 2,
     "condition": {"file_exists": "{pack_path}/requirements.txt"},
     "command": "uv",
     "args": ["pip", "install", "--python", "{env_path}/bin/python", "-r", "{pack_path}/requirements.txt"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}}
  ],
  "executable_templates": {"python": "{env_path}/bin/python"},
  "env_vars": {"VIRTUAL_ENV": "{env_path}"},
  "requires_environment": true
}$old$ WHERE ref = 'core.python-uv';

-- Empty: no steps and no executables (NULL, [], {}, or an object without either), and not
-- declared as needing no environment.
UPDATE runtime r
SET installers = d.new
FROM packenvd_runtime_defaults d
WHERE r.ref = d.ref
  AND (r.installers = d.old
       OR r.installers IS NULL
       OR r.installers IN ('[]'::jsonb, '{}'::jsonb, 'null'::jsonb)
       OR (jsonb_typeof(r.installers) = 'object'
           AND coalesce(jsonb_array_length(CASE WHEN jsonb_typeof(r.installers -> 'installers') = 'array'
                                                THEN r.installers -> 'installers' END), 0) = 0
           AND coalesce(r.installers -> 'executable_templates', '{}'::jsonb) = '{}'::jsonb
           AND coalesce(r.installers ->> 'requires_environment', 'true') <> 'false'));
