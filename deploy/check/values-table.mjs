// Prints the Markdown table of the chart's values (key, default, what it does) from
// helm/token-broker/values.schema.json (descriptions) and values.yaml (defaults), for the
// README's "Deploying" section. scripts/deploy-check.sh fails when the README's copy differs.
//
// usage: node values-table.mjs --modules=DIR [--check=README.md | --write=README.md]
//   The table sits between the lines <!-- helm-values:begin --> and <!-- helm-values:end -->.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const args = process.argv.slice(2);
const opt = (name) => args.find((x) => x.startsWith(`--${name}=`))?.slice(name.length + 3);
const require = createRequire(path.join(path.resolve(opt("modules") ?? "."), "package.json"));
const YAML = require("yaml");
const chart = path.join(path.dirname(fileURLToPath(import.meta.url)), "../../helm/token-broker");
const schema = JSON.parse(fs.readFileSync(path.join(chart, "values.schema.json"), "utf8"));
const values = YAML.parse(fs.readFileSync(path.join(chart, "values.yaml"), "utf8"), { version: "1.1" });

function show(v) {
  if (v === undefined) return "";
  const text = typeof v === "string" ? JSON.stringify(v) : JSON.stringify(v);
  return text.length > 48 ? "see values.yaml" : "`" + text.replaceAll("|", "\\|") + "`";
}
const rows = [];
function walk(node, key, value) {
  if (node.type === "object" && node.properties && node.additionalProperties === false) {
    for (const [k, child] of Object.entries(node.properties)) {
      walk(child, key ? `${key}.${k}` : k, value?.[k]);
    }
    return;
  }
  let what = node.description ?? "";
  if (node.enum) what += ` One of ${node.enum.map((e) => "`" + e + "`").join(", ")}.`;
  // A config key the values leave out has the broker's own default (README, "Configuration").
  const shown = value !== undefined ? show(value) : node.default !== undefined ? `${show(node.default)} (broker)` : "";
  what = what.trim().replaceAll("|", "\\|").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
  rows.push(`| \`${key}\` | ${shown} | ${what} |`);
}
walk(schema, "", values);
const table = ["| value | default | what it does |", "|---|---|---|", ...rows].join("\n");

const begin = "<!-- helm-values:begin -->";
const end = "<!-- helm-values:end -->";
const file = opt("check") ?? opt("write");
if (!file) {
  console.log(table);
  process.exit(0);
}
const text = fs.readFileSync(file, "utf8");
const i = text.indexOf(begin);
const j = text.indexOf(end);
if (i < 0 || j < i) {
  console.error(`${file}: no ${begin} ... ${end} block`);
  process.exit(1);
}
const updated = `${text.slice(0, i)}${begin}\n${table}\n${text.slice(j)}`;
if (opt("write")) {
  fs.writeFileSync(file, updated);
} else if (updated !== text) {
  console.error(`${file}: the values table is out of date; run: node deploy/check/values-table.mjs --modules=${opt("modules")} --write=${file}`);
  process.exit(1);
}
