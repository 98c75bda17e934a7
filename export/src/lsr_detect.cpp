// lsr_detect: run a TorchScript bundle written by `lsr-export --format torchscript`
// without Python.
//
//   lsr_detect BUNDLE IMAGE.png... --out DIR [--batch-size N] [--threads N] [--device cpu|cuda]
//              [--tau X] [--seed N] [--restorations N] [--save-codes] [--masks]
//
// Per image: DIR/<stem>_map.png (the anomaly map, min-max scaled to 8 bits), DIR/<stem>_map.f32
// (raw little-endian float32, the image's own height x width, as the Python path's TIFF), and
// one JSON line in DIR/results.jsonl. Detection is lsr.detect.Detector.detect: encode, decode
// the direct reconstruction, resample with the native loop (csrc/resample, the same C++ as
// `--resampler native`), decode, post-process; noise and seeds as bundle.json "noise" says.
//
// Verdicts (lsr.decision.verdict, the one definition; tests hold this file to it): each row
// gets "anomalous" (score > bundle.json detect.image_threshold), "threshold",
// "normalised_score" (score / threshold), "false_alarm_rate", "pixel_threshold", "pixel_fpr"
// and, with a pixel threshold, "n_regions" and "regions" (the connected components, 8-connected,
// of the map at the image's own size above the pixel threshold; see `regions` below). A bundle
// without thresholds (older lsr-export) or --tau/--seed/--restorations other than the exported
// values (the thresholds hold for the exported settings only) gives null verdict fields.
// --masks: DIR/masks/<stem>.png, 255 where that map exceeds the pixel threshold, else 0.
//
// Bad input (exit 2, one line "lsr_detect: error: ..." naming the flag or the file): every
// flag and every value read from bundle.json follows the rules of lsr.config.RULES (below,
// `lsr_detect --rules`); graph files are plain names inside the bundle folder; every image is
// decoded once before any work, refused above Pillow's pixel limit (image_io.h). So a bad
// input writes nothing. A failure during the work leaves an earlier results.jsonl as it was
// and writes the rows of the images finished before it to DIR/results.partial.jsonl.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include "image_io.h"
#include "json.h"
#include "resample/resample.h"
#include "sha256.h"

namespace fs = std::filesystem;

namespace {

constexpr int kBundleVersionMin = 3, kBundleVersionMax = 4;  // lsr.deploy.bundle.READ_VERSIONS

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- value rules ----------------------------------------------------------------------
// The rules of lsr.config.RULES / OPTION_RULES (the one list; README "Valid values") for the
// values this runtime reads, with the same wording ("must be <rule>, got <value>", from
// Rule.describe). `lsr_detect --rules` prints them; tests/test_cpp_runtime.py checks them
// against lsr.config.
struct IntRule {
  int64_t lo, hi;
  std::string describe() const { return "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]"; }
  bool ok(int64_t v) const { return v >= lo && v <= hi; }
};

std::string num(double x) {  // lsr.config._num
  char buf[64];
  if (x == std::floor(x) && std::fabs(x) < 1e15)
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(x));
  else
    std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

struct FloatRule {
  double lo, hi;
  bool open_lo, open_hi;
  bool optional = false;  // null allowed (Rule.optional): the thresholds of a bundle
  std::string describe() const {
    return "a finite number in " + std::string(open_lo ? "(" : "[") + num(lo) + ", " + num(hi) + (open_hi ? ")" : "]") +
           (optional ? " (or null)" : "");
  }
  bool ok(double v) const {
    return std::isfinite(v) && (open_lo ? v > lo : v >= lo) && (open_hi ? v < hi : v <= hi);
  }
};

constexpr int64_t kMaxSeed = std::numeric_limits<int64_t>::max() - 1;  // 2^63 - 2 (lsr.config._MAX_SEED)

struct NamedRule {
  const char* key;     // bundle.json key or flag
  const char* python;  // the key in lsr.config.RULES / OPTION_RULES
  bool is_int;
  IntRule i;
  FloatRule f;
};

const IntRule kImageSize{8, 4096}, kChannels{1, 3}, kGridSize{1, 1024}, kCodebookSize{2, 65536};
const IntRule kSeen{1, 65536};
const IntRule kSeed{0, kMaxSeed}, kRestorations{1, 64}, kBatchSize{1, 4096}, kThreads{0, 4096};
const FloatRule kTau{0.0, 1.0, true, true}, kTemperature{0.0, 1e3, true, false};
const FloatRule kPosterior{0.0, 1e3, false, false}, kPosteriorScale{0.0, 1e12, true, false, true};
const FloatRule kRate{0.0, 0.5, true, false}, kThreshold{-1e12, 1e12, false, false, true};
const FloatRule kStatMean{-1e12, 1e12, false, false, true}, kStatStd{0.0, 1e12, true, false, true};

const std::vector<NamedRule>& rules() {
  static const std::vector<NamedRule> table = {
      {"model.image_size", "vqvae.image_size", true, kImageSize, {}},
      {"model.channels", "vqvae.in_channels", true, kChannels, {}},
      {"model.grid_size", "prior.grid_size", true, kGridSize, {}},
      {"model.codebook_size", "vqvae.codebook_size", true, kCodebookSize, {}},
      {"model.seen_channels", "model.seen_channels", true, kSeen, {}},  // lsr.config.BUNDLE_RULES
      {"model.seen_size", "model.seen_size", true, kSeen, {}},
      {"detect.tau", "detect.tau", false, {}, kTau},
      {"detect.temperature", "detect.temperature", false, {}, kTemperature},
      {"detect.seed", "detect.seed", true, kSeed, {}},
      {"detect.restorations", "detect.restorations", true, kRestorations, {}},
      {"detect.posterior", "detect.posterior", false, {}, kPosterior},
      {"detect.posterior_scale", "detect.posterior_scale", false, {}, kPosteriorScale},
      {"detect.false_alarm_rate", "detect.false_alarm_rate", false, {}, kRate},
      {"detect.pixel_fpr", "detect.pixel_fpr", false, {}, kRate},
      {"detect.image_threshold", "detect.image_threshold", false, {}, kThreshold},
      {"detect.pixel_threshold", "detect.pixel_threshold", false, {}, kThreshold},
      {"detect.score_mean", "detect.score_mean", false, {}, kStatMean},
      {"detect.score_std", "detect.score_std", false, {}, kStatStd},
      {"detect.nll_mean", "detect.nll_mean", false, {}, kStatMean},
      {"detect.nll_std", "detect.nll_std", false, {}, kStatStd},
      {"--tau", "detect.tau", false, {}, kTau},
      {"--seed", "detect.seed", true, kSeed, {}},
      {"--restorations", "detect.restorations", true, kRestorations, {}},
      {"--batch-size", "batch_size", true, kBatchSize, {}},
      {"--threads", "threads", true, kThreads, {}},
  };
  return table;
}

// A value as Python's repr shows it in lsr.config's errors: text quoted, numbers bare.
std::string quoted(const std::string& text) {
  std::string out = "'";
  for (const unsigned char c : text) {
    if (c < 0x20 || c == 0x7f || c == '\\' || c == '\'') {
      char buf[8];
      if (c == '\\' || c == '\'')
        std::snprintf(buf, sizeof buf, "\\%c", c);
      else
        std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "'";
}

// Strict integer text: an optional sign and decimal digits, nothing else (no "12abc", no
// "1.5", no spaces). false when not an integer; `*overflow` when beyond int64.
bool parse_int(const std::string& text, int64_t* out, bool* overflow) {
  *overflow = false;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (first != last && *first == '+') ++first;
  if (first == last || (*first == '-' && first + 1 == last)) return false;
  for (const char* c = *first == '-' ? first + 1 : first; c != last; ++c)
    if (*c < '0' || *c > '9') return false;
  const auto [end, ec] = std::from_chars(first, last, *out);
  if (ec == std::errc::result_out_of_range) {
    *overflow = true;
    return false;
  }
  return ec == std::errc() && end == last;
}

// Strict number text, as Python's float(): [+-] digits [. digits] [e [+-] digits] (or
// ".5", "5."), or nan / inf / infinity (refused later as not finite). No hex, no spaces.
bool parse_float(const std::string& text, double* out) {
  size_t i = 0;
  const size_t n = text.size();
  if (i < n && (text[i] == '+' || text[i] == '-')) ++i;
  std::string rest = text.substr(i);
  std::transform(rest.begin(), rest.end(), rest.begin(), [](unsigned char c) { return std::tolower(c); });
  if (rest == "nan" || rest == "inf" || rest == "infinity") {
    *out = std::strtod(text.c_str(), nullptr);
    return true;
  }
  auto digits = [&] {
    const size_t d0 = i;
    while (i < n && text[i] >= '0' && text[i] <= '9') ++i;
    return i - d0;
  };
  size_t mantissa = digits();
  if (i < n && text[i] == '.') {
    ++i;
    mantissa += digits();
  }
  if (mantissa == 0) return false;
  if (i < n && (text[i] == 'e' || text[i] == 'E')) {
    ++i;
    if (i < n && (text[i] == '+' || text[i] == '-')) ++i;
    if (digits() == 0) return false;
  }
  if (i != n) return false;
  *out = std::strtod(text.c_str(), nullptr);
  return true;
}

const NamedRule& rule_of(const std::string& key) {
  for (const auto& r : rules())
    if (key == r.key) return r;
  throw std::logic_error("no rule for " + key);
}

// A command-line value checked against its rule; the error names the flag.
int64_t flag_int(const std::string& flag, const std::string& text) {
  const IntRule& r = rule_of(flag).i;
  int64_t v = 0;
  bool overflow = false;
  const bool is_int = parse_int(text, &v, &overflow);
  if (!is_int || !r.ok(v))
    throw Error(flag + ": must be " + r.describe() + ", got " + (is_int || overflow ? text : quoted(text)));
  return v;
}

double flag_float(const std::string& flag, const std::string& text) {
  const FloatRule& r = rule_of(flag).f;
  double v = 0;
  const bool is_num = parse_float(text, &v);
  if (!is_num || !r.ok(v)) throw Error(flag + ": must be " + r.describe() + ", got " + (is_num ? text : quoted(text)));
  return v;
}

// ---- bundle.json ---------------------------------------------------------------------

// A JSON value as Python's repr shows it (the "got ..." of an error).
std::string shown(const lsr::json::Value& v) {
  using K = lsr::json::Value;
  switch (v.kind) {
    case K::Null: return "None";
    case K::Bool: return v.b ? "True" : "False";
    case K::Number: return v.str;  // the literal as written in the file
    case K::String: return quoted(v.str);
    case K::Array: return "an array";
    default: return "an object";
  }
}

// The value at a dotted key ("model.image_size"); errors name the key.
const lsr::json::Value& get(const lsr::json::Value& root, const std::string& dotted) {
  const lsr::json::Value* v = &root;
  size_t start = 0;
  while (true) {
    const size_t dot = dotted.find('.', start);
    const std::string part = dotted.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (v->kind != lsr::json::Value::Object)
      throw Error((start ? dotted.substr(0, start - 1) : std::string("the file")) + ": must be a JSON object, got " +
                  shown(*v));
    if (!v->has(part)) throw Error("missing key " + dotted.substr(0, dot));
    v = &v->obj.at(part);
    if (dot == std::string::npos) return *v;
    start = dot + 1;
  }
}

// An integer of bundle.json: an integer literal (not 1.0, not 1e12) within its rule.
int64_t json_int(const lsr::json::Value& root, const std::string& key) {
  const lsr::json::Value& v = get(root, key);
  const IntRule& r = rule_of(key).i;
  int64_t x = 0;
  bool overflow = false;
  const bool literal_int = v.kind == lsr::json::Value::Number && parse_int(v.str, &x, &overflow);
  if (!literal_int || !r.ok(x)) throw Error(key + ": must be " + r.describe() + ", got " + shown(v));
  return x;
}

double json_float(const lsr::json::Value& root, const std::string& key) {
  const lsr::json::Value& v = get(root, key);
  const FloatRule& r = rule_of(key).f;
  if (v.kind != lsr::json::Value::Number || !r.ok(v.num))
    throw Error(key + ": must be " + r.describe() + ", got " + shown(v));
  return v.num;
}

// A value of the detect section that older bundles lack: `missing` when the key is absent,
// nullopt for null where the rule allows it (a bundle without thresholds), else checked.
std::optional<double> json_float_or(const lsr::json::Value& root, const std::string& key,
                                    std::optional<double> missing) {
  const size_t dot = key.rfind('.');
  const lsr::json::Value& section = get(root, key.substr(0, dot));
  if (section.kind == lsr::json::Value::Object && !section.has(key.substr(dot + 1))) return missing;
  const lsr::json::Value& v = get(root, key);
  if (v.kind == lsr::json::Value::Null && rule_of(key).f.optional) return std::nullopt;
  return json_float(root, key);
}

const std::string& json_string(const lsr::json::Value& root, const std::string& key) {
  const lsr::json::Value& v = get(root, key);
  if (v.kind != lsr::json::Value::String) throw Error(key + ": must be a string, got " + shown(v));
  return v.str;
}

// A graph file of bundle.json: a plain file name inside the bundle folder (no "..", no
// absolute path, no separator, not a symbolic link out of the folder).
fs::path graph_path(const fs::path& dir, const std::string& key, const std::string& file) {
  const bool plain = !file.empty() && file != "." && file != ".." && file.find('/') == std::string::npos &&
                     file.find('\\') == std::string::npos && file.find('\0') == std::string::npos &&
                     fs::path(file).filename().string() == file;
  if (!plain) throw Error(key + ": must be a plain file name inside the bundle folder, got " + quoted(file));
  const fs::path path = dir / file;
  std::error_code ec;
  if (fs::is_symlink(fs::symlink_status(path, ec))) {
    std::error_code e1, e2;
    const fs::path target = fs::canonical(path, e1), root = fs::canonical(dir, e2);
    if (e1 || e2 || target.parent_path() != root)
      throw Error(key + ": must be a plain file name inside the bundle folder, got " + quoted(file) +
                  (e1 ? ", a broken symbolic link" : ", a symbolic link to " + target.string()));
  }
  return path;
}

struct Bundle {
  int image_size = 0, channels = 0, grid = 0, K = 0;
  double tau = 0, temperature = 1;
  int64_t seed = 0;
  int restorations = 1;
  // the operating point (lsr.decision), set at export for the settings above
  std::optional<double> false_alarm_rate, pixel_fpr;  // null in a bundle older than the operating point
  std::optional<double> image_threshold, pixel_threshold;
  // held-out normal images' score_mean, score_std, nll_mean, nll_std (the fused score; NaN: missing)
  std::array<float, 4> held_out{NAN, NAN, NAN, NAN};
  int seen_channels = 0, seen_size = 0;  // what the VQ-VAE sees: the image, or its features
  // the posterior draw (bundle version 4; docs/method.md section 3): 0 draws from the prior
  double posterior = 0, posterior_scale = 0;
  std::map<std::string, fs::path> graphs;
};

Bundle read_bundle(const fs::path& dir) {
  const fs::path meta_path = dir / "bundle.json";
  if (!fs::is_directory(dir)) throw Error(dir.string() + ": bundle folder not found");
  std::ifstream f(meta_path);
  if (!f || fs::is_directory(meta_path)) throw Error(meta_path.string() + ": not an lsr bundle (bundle.json not found)");
  std::stringstream text;
  text << f.rdbuf();
  lsr::json::Value meta;
  try {
    meta = lsr::json::parse(text.str());
  } catch (const std::exception& e) {
    throw Error(meta_path.string() + ": " + e.what());
  }
  Bundle b;
  try {
    if (meta.kind != lsr::json::Value::Object) throw Error("must be a JSON object, got " + shown(meta));
    const lsr::json::Value& version = get(meta, "bundle_version");
    if (!(version.kind == lsr::json::Value::Number && (version.num == kBundleVersionMin || version.num == kBundleVersionMax)))
      throw Error("bundle version " + shown(version) + " is not supported (this runtime reads versions " +
                  std::to_string(kBundleVersionMin) + " to " + std::to_string(kBundleVersionMax) +
                  "); re-export with the matching lsr-export");
    const std::string& format = json_string(meta, "format");
    if (format != "torchscript")
      throw Error("a " + format + " bundle; the C++ runtime runs TorchScript bundles "
                  "(lsr-export RUN --format torchscript --out DIR)");
    b.image_size = static_cast<int>(json_int(meta, "model.image_size"));
    b.channels = static_cast<int>(json_int(meta, "model.channels"));
    if (b.channels == 2) throw Error("model.channels: must be 1 or 3, got 2");  // as lsr.config
    b.grid = static_cast<int>(json_int(meta, "model.grid_size"));
    b.K = static_cast<int>(json_int(meta, "model.codebook_size"));
    b.tau = json_float(meta, "detect.tau");
    b.temperature = json_float(meta, "detect.temperature");
    b.seed = json_int(meta, "detect.seed");  // from the literal: seeds beyond 2^53 stay exact
    b.restorations = static_cast<int>(json_int(meta, "detect.restorations"));
    // the posterior draw (absent before it existed: the prior's draw); only in version 4
    b.posterior = json_float_or(meta, "detect.posterior", 0.0).value_or(0.0);
    const auto scale = json_float_or(meta, "detect.posterior_scale", std::nullopt);  // checked when present
    if (b.posterior != 0.0) {
      if (version.num < 4)
        throw Error("detect.posterior is " + shown(get(meta, "detect.posterior")) + " in a version-" +
                    shown(version) + " bundle, which draws from the prior alone; export the run again");
      if (!scale)
        throw Error("detect.posterior is " + shown(get(meta, "detect.posterior")) +
                    " but detect.posterior_scale is missing");
      b.posterior_scale = *scale;
    }
    // absent from bundles of lsr-export before the operating point: no thresholds, default rates
    b.false_alarm_rate = json_float_or(meta, "detect.false_alarm_rate", std::nullopt);
    b.pixel_fpr = json_float_or(meta, "detect.pixel_fpr", std::nullopt);
    b.image_threshold = json_float_or(meta, "detect.image_threshold", std::nullopt);
    b.pixel_threshold = json_float_or(meta, "detect.pixel_threshold", std::nullopt);
    {
      const char* stats[4] = {"detect.score_mean", "detect.score_std", "detect.nll_mean", "detect.nll_std"};
      for (int k = 0; k < 4; ++k)
        b.held_out[k] = static_cast<float>(json_float_or(meta, stats[k], std::nullopt).value_or(NAN));
    }
    b.seen_channels = static_cast<int>(json_int(meta, "model.seen_channels"));
    b.seen_size = static_cast<int>(json_int(meta, "model.seen_size"));
    // the four graphs, then prior_native (the prior on the native attention kernels, written
    // when lsr-export had the extension): this runtime links the op library, so it prefers it
    const auto& graphs = get(meta, "graphs");
    if (graphs.kind != lsr::json::Value::Object)
      throw Error("graphs: must be a JSON object holding the graphs encoder, prior, decoder and postprocess, got " +
                  shown(graphs));
    for (const std::string name : {"encoder", "prior", "decoder", "postprocess", "prior_native", "code_distances"}) {
      if (name == "prior_native" && !graphs.has(name)) continue;
      if (name == "code_distances" && b.posterior == 0.0) continue;  // only the posterior draw uses it
      if (name == "code_distances" && !graphs.has(name))
        throw Error("detect.posterior is " + shown(get(meta, "detect.posterior")) +
                    " but the bundle has no code_distances graph");
      if (!graphs.has(name))
        throw Error("missing key graphs." + name + " (a bundle holds the graphs encoder, prior, decoder and postprocess)");
      const std::string key = "graphs." + name;
      const fs::path path = graph_path(dir, key + ".file", json_string(meta, key + ".file"));
      if (!fs::is_regular_file(path))
        throw Error(path.string() + ": graph file missing from the bundle (" + name + " graph)");
      const std::string& recorded = json_string(meta, key + ".sha256");
      const std::string digest = lsr::sha256_file(path.string());
      if (digest != recorded)
        throw Error(path.string() + ": sha256 " + digest.substr(0, 12) +
                    "... does not match bundle.json: the graph was edited or replaced after export");
      b.graphs[name == "prior_native" ? "prior" : name] = path;
    }
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (msg.rfind((dir / "").string(), 0) == 0) throw;  // already names a file of the bundle
    throw Error(meta_path.string() + ": " + msg);
  } catch (const std::exception& e) {
    throw Error(meta_path.string() + ": " + e.what());
  }
  return b;
}

// lsr.detect.chain_seed: ((seed * 1000003 + image_id) * 1009 + restoration) % (2**63 - 1)
int64_t chain_seed(int64_t seed, int64_t image_id, int64_t restoration) {
  const __int128 m = (static_cast<__int128>(1) << 63) - 1;
  __int128 v = (static_cast<__int128>(seed) * 1000003 + image_id) * 1009 + restoration;
  v %= m;
  if (v < 0) v += m;
  return static_cast<int64_t>(v);
}

// lsr.ops.resampling.gumbel_noise for one chain: torch.rand(T, K) of a CPU generator
// seeded with `seed`, -log(-log(u)) in float64 (u clamped), rounded to float32.
at::Tensor gumbel(int64_t seed, int64_t T, int64_t K) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  at::Tensor u = at::rand({T, K}, gen, at::TensorOptions().dtype(at::kFloat));
  const double tiny = static_cast<double>(std::numeric_limits<float>::min());
  u = u.to(at::kDouble).clamp_(tiny, 1.0 - 1e-7);
  return (-at::log(-at::log(u))).to(at::kFloat);
}

std::vector<std::string> unique_stems(const std::vector<fs::path>& paths) {
  std::map<std::string, int> seen;
  std::vector<std::string> out;
  for (const auto& p : paths) {
    const std::string stem = p.stem().string();
    const int k = seen[stem]++;
    out.push_back(k == 0 ? stem : stem + "_" + std::to_string(k));
  }
  return out;
}

std::string fmt(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// A double as Python's json writes it up to the form of integral values ("2" for 2.0): the
// shortest text that reads back as the same double; null when not finite.
std::string exact(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return ec == std::errc() ? std::string(buf, end) : fmt(v);
}

std::string exact(const std::optional<double>& v) { return v ? exact(*v) : "null"; }

// ---- regions (lsr.decision.regions / label / mask) ----------------------------------------
constexpr size_t kMaxRegions = 50;  // lsr.decision.MAX_REGIONS

struct Region {
  int64_t area = 0;
  int x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  float peak = -std::numeric_limits<float>::infinity();
  int64_t first_peak = -1;  // raster index of the first pixel holding the peak
};

// numpy compares a float32 map with a Python float in float32 (the float is cast to the
// array's dtype), so the threshold is rounded to float32 first, as there.
float map_threshold(double t) { return static_cast<float>(t); }

// The connected components (8-connectivity) of map > t on an (H, W) map: labelled 1..n in
// raster order of each component's first pixel (as lsr.decision.label); per component its
// area, inclusive bounding box, peak and the first pixel (raster order) at the peak. Returned
// in the order of lsr.decision.regions: peak descending, ties in label order; all of them
// (the row lists the first kMaxRegions, n_regions counts all).
std::vector<Region> regions(const float* m, int H, int W, double threshold) {
  const float t = map_threshold(threshold);
  const int64_t N = static_cast<int64_t>(H) * W;
  std::vector<int32_t> lab(static_cast<size_t>(N), 0);
  std::vector<int64_t> stack;
  int32_t n = 0;
  for (int64_t k = 0; k < N; ++k) {
    if (lab[k] || !(m[k] > t)) continue;
    lab[k] = ++n;
    stack.push_back(k);
    while (!stack.empty()) {
      const int64_t q = stack.back();
      stack.pop_back();
      const int y = static_cast<int>(q / W), x = static_cast<int>(q % W);
      for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx) {
          const int yy = y + dy, xx = x + dx;
          if ((dy == 0 && dx == 0) || yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
          const int64_t r = static_cast<int64_t>(yy) * W + xx;
          if (!lab[r] && m[r] > t) {
            lab[r] = n;
            stack.push_back(r);
          }
        }
    }
  }
  std::vector<Region> out(static_cast<size_t>(n));
  for (auto& r : out) r.x0 = W, r.y0 = H;
  for (int64_t k = 0; k < N; ++k) {  // raster order: the first pixel at the peak wins ties
    if (!lab[k]) continue;
    Region& r = out[lab[k] - 1];
    const int y = static_cast<int>(k / W), x = static_cast<int>(k % W);
    ++r.area;
    r.x0 = std::min(r.x0, x), r.y0 = std::min(r.y0, y), r.x1 = std::max(r.x1, x), r.y1 = std::max(r.y1, y);
    if (m[k] > r.peak) r.peak = m[k], r.first_peak = k;
  }
  std::stable_sort(out.begin(), out.end(), [](const Region& a, const Region& b) { return a.peak > b.peak; });
  return out;
}

// `"n_regions": N, "regions": [...]` of lsr.decision.verdict (the first kMaxRegions listed).
std::string regions_json(const std::vector<Region>& regs, int W) {
  std::ostringstream o;
  o << "\"n_regions\": " << regs.size() << ", \"regions\": [";
  for (size_t k = 0; k < std::min(regs.size(), kMaxRegions); ++k) {
    const Region& r = regs[k];
    o << (k ? ", " : "") << "{\"area\": " << r.area << ", \"bbox\": [" << r.x0 << ", " << r.y0 << ", " << r.x1 << ", "
      << r.y1 << "], \"peak\": " << exact(static_cast<double>(r.peak)) << ", \"peak_xy\": [" << r.first_peak % W << ", "
      << r.first_peak / W << "]}";
  }
  o << "]";
  return o.str();
}

// The verdict fields of a row (lsr.decision.verdict), from the leading ", "; `*n_regions`
// counts the regions (0 without a pixel threshold).
std::string verdict_fields(double score, const float* m, int H, int W, const Bundle& b, size_t* n_regions) {
  *n_regions = 0;
  std::ostringstream o;
  const auto& t = b.image_threshold;
  const bool decided = t && std::isfinite(score);
  o << ", \"anomalous\": " << (decided ? (score > *t ? "true" : "false") : "null") << ", \"threshold\": " << exact(t)
    << ", \"normalised_score\": " << (decided && *t > 0 ? exact(score / *t) : "null")
    << ", \"false_alarm_rate\": " << exact(b.false_alarm_rate) << ", \"pixel_threshold\": " << exact(b.pixel_threshold)
    << ", \"pixel_fpr\": " << exact(b.pixel_fpr);
  if (b.pixel_threshold) {
    const std::vector<Region> regs = regions(m, H, W, *b.pixel_threshold);
    *n_regions = regs.size();
    o << ", " << regions_json(regs, W);
  }
  return o.str();
}

void write_atomic(const fs::path& path, const std::string& bytes) {
  const fs::path tmp = path.string() + ".tmp";
  std::error_code ec;
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw Error(path.string() + ": cannot write");
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.close();
    if (!f) {
      fs::remove(tmp, ec);
      throw Error(path.string() + ": write failed (disk full?)");
    }
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw Error(path.string() + ": cannot rename the finished file into place (" + ec.message() + ")");
  }
}

int usage(const char* msg = nullptr) {
  if (msg) std::cerr << "lsr_detect: error: " << msg << "\n";
  std::cerr << "usage: lsr_detect BUNDLE IMAGE.png... --out DIR [--batch-size N] [--threads N]\n"
               "                  [--device cpu|cuda] [--tau X] [--seed N] [--restorations N] [--save-codes]\n"
               "                  [--masks]   (binary defect masks in DIR/masks, at the bundle's pixel threshold)\n"
               "       lsr_detect --rules   (the value rules applied to the flags and bundle.json)\n"
               "       lsr_detect --regions MAP.f32 HEIGHT WIDTH THRESHOLD   (a raw map's regions, for tests)\n";
  return 2;
}

// The rules, a line each: KEY<TAB>PYTHON KEY<TAB>RULE (tests compare them with lsr.config).
void print_rules() {
  for (const auto& r : rules()) std::cout << r.key << "\t" << r.python << "\t" << (r.is_int ? r.i.describe() : r.f.describe()) << "\n";
  std::cout << "image pixels\tPIL.Image.MAX_IMAGE_PIXELS\tat most " << lsr::image::kMaxImagePixels << "\n";
}

// `lsr_detect --regions MAP.f32 HEIGHT WIDTH THRESHOLD`: the regions of a raw float32 map
// (as DIR/<stem>_map.f32) above a pixel threshold, as one JSON object; for tests, which hold
// them to lsr.decision.regions on maps the model would not make (ties, diagonal chains,
// hundreds of components).
int print_regions(int argc, char** argv) {
  if (argc != 6) return usage("--regions needs MAP.f32 HEIGHT WIDTH THRESHOLD");
  auto side = [](const char* what, const std::string& text) {
    int64_t v = 0;
    bool overflow = false;
    if (!parse_int(text, &v, &overflow) || v < 1 || v > 65536)
      throw Error(std::string("--regions ") + what + ": must be an integer in [1, 65536], got " + text);
    return static_cast<int>(v);
  };
  const int H = side("height", argv[3]), W = side("width", argv[4]);
  if (static_cast<uint64_t>(H) * W > lsr::image::kMaxImagePixels)
    throw Error("--regions: a map of at most " + std::to_string(lsr::image::kMaxImagePixels) + " pixels");
  double t = 0;
  if (!parse_float(argv[5], &t) || !kThreshold.ok(t))
    throw Error(std::string("--regions threshold: must be ") + kThreshold.describe() + ", got " + argv[5]);
  std::ifstream f(argv[2], std::ios::binary);
  std::vector<float> m(static_cast<size_t>(H) * W);
  f.read(reinterpret_cast<char*>(m.data()), static_cast<std::streamsize>(m.size() * sizeof(float)));
  if (!f || f.peek() != EOF) throw Error(std::string(argv[2]) + ": not a float32 map of " + argv[3] + " x " + argv[4]);
  std::cout << "{" << regions_json(regions(m.data(), H, W, t), W) << "}\n";
  return 0;
}

// An exception's message without LibTorch's C++ stack trace.
std::string message(const std::exception& e) {
  if (const auto* c10e = dynamic_cast<const c10::Error*>(&e)) return c10e->what_without_backtrace();
  return e.what();
}

// --device: cpu, cuda or cuda:N.
std::string check_device(const std::string& name) {
  bool ok = name == "cpu" || name == "cuda";
  if (!ok && name.rfind("cuda:", 0) == 0 && name.size() > 5) {
    ok = true;
    for (size_t k = 5; k < name.size(); ++k) ok = ok && name[k] >= '0' && name[k] <= '9';
    ok = ok && name.size() <= 9;
  }
  if (!ok) throw Error("--device: must be one of cpu, cuda, cuda:N, got " + quoted(name));
  return name;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--regions") {
    try {
      return print_regions(argc, argv);
    } catch (const std::exception& e) {
      std::cerr << "lsr_detect: error: " << e.what() << "\n";
      return 2;
    }
  }
  std::vector<std::string> pos;
  fs::path out;
  int batch_size = 8, threads = 0;
  std::string device_name = "cpu";
  bool save_codes = false, masks = false;
  std::optional<double> tau_override;
  std::optional<int64_t> seed_override;
  std::optional<int> restorations_override;
  // every flag checked against its rule (lsr.config) before anything is read or written
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&](const char* what) -> std::string {
      if (i + 1 >= argc) throw Error(std::string(what) + ": needs a value");
      return argv[++i];
    };
    try {
      if (a == "--out") out = next("--out");
      else if (a == "--batch-size") batch_size = static_cast<int>(flag_int(a, next("--batch-size")));
      else if (a == "--threads") threads = static_cast<int>(flag_int(a, next("--threads")));
      else if (a == "--device") device_name = check_device(next("--device"));
      else if (a == "--tau") tau_override = flag_float(a, next("--tau"));
      else if (a == "--seed") seed_override = flag_int(a, next("--seed"));
      else if (a == "--restorations") restorations_override = static_cast<int>(flag_int(a, next("--restorations")));
      else if (a == "--save-codes") save_codes = true;
      else if (a == "--masks") masks = true;
      else if (a == "--rules") return print_rules(), 0;
      else if (a == "-h" || a == "--help") return usage(), 0;
      else if (a.rfind("--", 0) == 0) return usage(("unknown option " + a).c_str());
      else pos.push_back(a);
    } catch (const std::exception& e) {
      return usage(e.what());
    }
  }
  if (pos.size() < 2 || out.empty()) return usage("give a bundle, at least one image and --out DIR");
  try {
    Bundle b = read_bundle(pos[0]);
    // the exported thresholds hold for the exported settings only (as lsr.deploy.Inferencer)
    if ((tau_override && *tau_override != b.tau) || (seed_override && *seed_override != b.seed) ||
        (restorations_override && *restorations_override != b.restorations)) {
      b.image_threshold = b.pixel_threshold = std::nullopt;
      b.held_out.fill(NAN);  // the fused score's statistics too (lsr.detect.Detector.with_options)
    }
    if (tau_override) b.tau = *tau_override;
    if (seed_override) b.seed = *seed_override;
    if (restorations_override) b.restorations = *restorations_override;
    const c10::Device device(device_name);
    if (device.is_cuda() && !torch::cuda::is_available())
      throw Error("--device " + device_name + ": CUDA is not available (no GPU, or LibTorch without CUDA)");
    {
      std::error_code ec;
      if (fs::exists(out, ec) && !fs::is_directory(out, ec))
        throw Error("--out " + out.string() + ": exists and is not a folder");
    }
    // every input decoded once (one row of memory each) before any work: a missing, cut,
    // corrupt or too large image fails here, with nothing written
    std::vector<fs::path> paths(pos.begin() + 1, pos.end());
    for (const auto& p : paths) lsr::image::verify_png(p.string());
    if (threads > 0) at::set_num_threads(threads);
    std::map<std::string, torch::jit::Module> m;
    for (const auto& [name, path] : b.graphs) {
      try {
        m.emplace(name, torch::jit::load(path.string(), device));
      } catch (const std::exception& e) {
        throw Error(path.string() + ": cannot load the TorchScript graph (" + message(e).substr(0, 300) + ")");
      }
      m.at(name).eval();
    }
    {
      std::error_code ec;
      fs::create_directories(out, ec);
      if (ec) throw Error("--out " + out.string() + ": cannot create the folder (" + ec.message() + ")");
    }
    // the lock of lsr.io.folder_lock: flock on the folder itself, held until the process
    // ends, so this runtime and the Python commands never write into one folder at once
    const int lock_fd = ::open(out.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (lock_fd < 0 || ::flock(lock_fd, LOCK_EX | LOCK_NB) != 0)
      throw Error("--out " + out.string() + ": another lsr command is writing into this folder; wait for it to "
                  "finish or choose another --out");
    const auto stems = unique_stems(paths);
    if (masks && !b.pixel_threshold)
      std::cerr << "lsr_detect: note: --masks: no pixel threshold ("
                << (tau_override || seed_override || restorations_override
                        ? "--tau/--seed/--restorations differ from the exported settings"
                        : "the bundle has none; export it again from a calibrated run")
                << "), so no masks are written\n";
    const int S = b.image_size, C = b.channels, n = b.restorations;
    const int64_t T = static_cast<int64_t>(b.grid) * b.grid;
    std::ostringstream lines;
    size_t done = 0;
    torch::NoGradGuard no_grad;
    try {
      for (size_t start = 0; start < paths.size(); start += batch_size) {
        const size_t B = std::min(paths.size() - start, static_cast<size_t>(batch_size));
        at::Tensor x = at::empty({static_cast<int64_t>(B), C, S, S}, at::kFloat);
        std::vector<std::pair<int, int>> sizes;
        for (size_t i = 0; i < B; ++i) {
          lsr::image::Float img = lsr::image::read_png(paths[start + i].string());
          sizes.emplace_back(img.height, img.width);
          img = lsr::image::resize_bilinear(lsr::image::to_channels(img, C), S, S);
          std::memcpy(x[static_cast<int64_t>(i)].data_ptr<float>(), img.data.data(), img.data.size() * sizeof(float));
        }
        const auto t0 = std::chrono::steady_clock::now();
        x = x.to(device);
        // the graph contract of lsr.deploy.bundle.graph_io: encoder -> (codes, seen),
        // decoder -> (picture, seen), postprocess = lsr.anomaly.postprocess
        auto enc = m.at("encoder").forward({x}).toTuple()->elements();
        at::Tensor codes = enc.at(0).toTensor(), seen = enc.at(1).toTensor();
        if (codes.dim() != 3 || codes.size(1) != b.grid || codes.size(2) != b.grid)
          throw Error((fs::path(pos[0]) / "bundle.json").string() + ": model.grid_size " + std::to_string(b.grid) +
                      " does not match the encoder graph, whose codes are " + c10::str(codes.sizes()));
        if (seen.dim() != 4 || seen.size(1) != b.seen_channels || seen.size(2) != b.seen_size || seen.size(3) != b.seen_size)
          throw Error((fs::path(pos[0]) / "bundle.json").string() + ": model.seen_channels/seen_size (" +
                      std::to_string(b.seen_channels) + ", " + std::to_string(b.seen_size) +
                      ") do not match the encoder graph, whose output seen is " + c10::str(seen.sizes()));
        auto dec = m.at("decoder").forward({codes}).toTuple()->elements();
        at::Tensor direct_seen = dec.at(1).toTensor();
        at::Tensor chains = codes.repeat_interleave(n, 0);
        std::vector<at::Tensor> noise;
        for (size_t i = 0; i < B; ++i)
          for (int r = 0; r < n; ++r) noise.push_back(gumbel(chain_seed(b.seed, static_cast<int64_t>(start + i), r), T, b.K));
        at::Tensor G = at::stack(noise).to(device);
        if (b.posterior != 0.0) {
          // lsr.ops.posterior_noise: G - d * float32(posterior / scale), d repeated per chain
          at::Tensor d = m.at("code_distances").forward({seen}).toTensor().repeat_interleave(n, 0);
          const at::Tensor factor =
              at::tensor(static_cast<float>(b.posterior / b.posterior_scale), at::kFloat).to(device);
          G = G - d * factor;
        }
        auto rs = lsr::resample_incremental(m.at("prior"), chains, G, b.tau, b.temperature);
        at::Tensor restored_seen = m.at("decoder").forward({rs.codes}).toTuple()->elements().at(1).toTensor();
        using at::indexing::Slice;
        at::Tensor lik = rs.likelihood.index({Slice(at::indexing::None, at::indexing::None, n)});
        // lsr.anomaly.nll_score
        at::Tensor nll = at::where(lik.lt(b.tau), -at::log(lik.clamp_min(1e-30)), at::zeros_like(lik)).flatten(1).sum(1);
        const int64_t Bn = static_cast<int64_t>(B);
        std::vector<int64_t> rshape{Bn, n};
        for (int64_t d = 1; d < restored_seen.dim(); ++d) rshape.push_back(restored_seen.size(d));
        auto post = m.at("postprocess")
                        .forward({seen, direct_seen, restored_seen.view(rshape),
                                  rs.resampled.view({Bn, n, b.grid, b.grid}).to(at::kFloat), nll.to(at::kFloat),
                                  at::tensor(std::vector<float>(b.held_out.begin(), b.held_out.end())).to(device)})
                        .toTuple()
                        ->elements();
        at::Tensor amap = post[0].toTensor().to(at::kCPU), score = post[1].toTensor().to(at::kCPU);
        at::Tensor direct_score = post[5].toTensor().to(at::kCPU), fused = post[7].toTensor().to(at::kCPU);
        nll = nll.to(at::kCPU);
        at::Tensor n_res = rs.resampled.to(at::kCPU).view({static_cast<int64_t>(B), n, -1}).sum(-1).to(at::kFloat).mean(1);
        at::Tensor passes = rs.prior_passes.view({static_cast<int64_t>(B), n}).sum(1);
        at::Tensor evaluated = rs.positions_evaluated.view({static_cast<int64_t>(B), n}).sum(1);
        at::Tensor first_codes = rs.codes.index({Slice(at::indexing::None, at::indexing::None, n)}).to(at::kCPU);
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / B;
        for (size_t i = 0; i < B; ++i) {
          const std::string& stem = stems[start + i];
          const auto [H, W] = sizes[i];
          at::Tensor mi = amap[static_cast<int64_t>(i)];
          if (H != S || W != S)  // lsr.anomaly.resize_maps
            mi = at::upsample_bilinear2d(mi.unsqueeze(0).unsqueeze(0), {H, W}, false).squeeze(0).squeeze(0);
          mi = mi.contiguous();
          const fs::path raw = out / (stem + "_map.f32"), png = out / (stem + "_map.png");
          write_atomic(raw, std::string(reinterpret_cast<const char*>(mi.data_ptr<float>()), mi.numel() * sizeof(float)));
          const float lo = mi.min().item<float>(), hi = mi.max().item<float>();
          std::vector<uint8_t> px(mi.numel());
          const float* mp = mi.data_ptr<float>();
          for (size_t k = 0; k < px.size(); ++k)
            px[k] = static_cast<uint8_t>(std::lround(hi > lo ? 255.0 * (mp[k] - lo) / (hi - lo) : 0.0));
          lsr::image::write_png_gray8(png.string(), px, H, W);
          const double s = score[static_cast<int64_t>(i)].item<double>();
          size_t n_regions = 0;
          const std::string verdict = verdict_fields(s, mp, H, W, b, &n_regions);
          fs::path mask_png;
          if (masks && b.pixel_threshold) {  // lsr.decision.mask
            const float t = map_threshold(*b.pixel_threshold);
            for (size_t k = 0; k < px.size(); ++k) px[k] = mp[k] > t ? 255 : 0;
            std::error_code ec;
            fs::create_directories(out / "masks", ec);
            if (ec) throw Error((out / "masks").string() + ": cannot create the folder (" + ec.message() + ")");
            mask_png = out / "masks" / (stem + ".png");
            lsr::image::write_png_gray8(mask_png.string(), px, H, W);
          }
          const int64_t p = passes[static_cast<int64_t>(i)].item<int64_t>();
          const int64_t e = evaluated[static_cast<int64_t>(i)].item<int64_t>();
          const int64_t later = p - n;
          std::ostringstream row;
          row << "{\"image\": " << lsr::json::quote(paths[start + i].string())
              << ", \"score\": " << fmt(score[static_cast<int64_t>(i)].item<double>())
              << ", \"nll_score\": " << fmt(nll[static_cast<int64_t>(i)].item<double>())
              << ", \"direct_score\": " << fmt(direct_score[static_cast<int64_t>(i)].item<double>())
              << ", \"fused_score\": " << fmt(fused[static_cast<int64_t>(i)].item<double>())
              << ", \"n_resampled\": " << fmt(n_res[static_cast<int64_t>(i)].item<double>()) << ", \"prior_passes\": " << p
              << ", \"positions_evaluated\": " << e << ", \"recomputed_fraction\": "
              << (later > 0 ? fmt(static_cast<double>(e - n * T) / static_cast<double>(later * T)) : "null")
              << ", \"n_codes\": " << T << ", \"time_ms\": " << fmt(ms) << ", \"map_png\": " << lsr::json::quote(png.string())
              << ", \"map_raw\": " << lsr::json::quote(raw.string()) << ", \"map_shape\": [" << H << ", " << W << "]"
              << verdict;
          if (!mask_png.empty()) row << ", \"mask\": " << lsr::json::quote(mask_png.string());
          if (save_codes) {
            row << ", \"resampled_codes\": [";
            const at::Tensor c = first_codes[static_cast<int64_t>(i)].flatten().contiguous();
            const int64_t* cp = c.const_data_ptr<int64_t>();
            for (int64_t k = 0; k < c.numel(); ++k) row << (k ? ", " : "") << cp[k];
            row << "]";
          }
          row << "}";
          lines << row.str() << "\n";
          ++done;
          std::cout << paths[start + i].string() << ": ";
          if (b.image_threshold && std::isfinite(s)) {  // as lsr.cli's rows
            char ratio[32] = "n/a";
            if (*b.image_threshold > 0) std::snprintf(ratio, sizeof ratio, "%.2f", s / *b.image_threshold);
            std::cout << (s > *b.image_threshold ? "REJECT" : "pass") << " (score/threshold " << ratio << ", "
                      << n_regions << " region(s))  ";
          }
          std::cout << "score " << fmt(s) << "  passes " << p << "  " << fmt(ms) << " ms\n";
        }
      }
    } catch (const std::exception& e) {
      // keep what is finished without touching an earlier results.jsonl (a command that
      // fails leaves the results of the last one that succeeded): the rows of the images
      // done so far go to results.partial.jsonl, their maps are in DIR
      std::string kept;
      if (done > 0) {
        const fs::path partial = out / "results.partial.jsonl";
        try {
          write_atomic(partial, lines.str());
          kept = " (the results of the " + std::to_string(done) + " images before it written to " + partial.string() +
                 ", their maps to " + out.string() + "; results.jsonl left as it was)";
        } catch (const std::exception&) {
          kept = " (" + std::to_string(done) + " images finished before it; their rows could not be written)";
        }
      }
      throw Error(message(e) + kept);
    }
    write_atomic(out / "results.jsonl", lines.str());
    // an earlier failed command's partial rows are stale now: results.jsonl is the answer
    std::error_code stale;
    fs::remove(out / "results.partial.jsonl", stale);
    std::cout << "results: " << (out / "results.jsonl").string() << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lsr_detect: error: " << message(e) << "\n";
    return 2;
  }
}
