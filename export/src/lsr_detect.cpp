// lsr_detect: run a TorchScript bundle written by `lsr-export --format torchscript`
// without Python.
//
//   lsr_detect BUNDLE IMAGE.png... --out DIR [--batch-size N] [--threads N] [--device cpu|cuda]
//              [--tau X] [--seed N] [--restorations N] [--save-codes]
//
// Per image: DIR/<stem>_map.png (the anomaly map, min-max scaled to 8 bits), DIR/<stem>_map.f32
// (raw little-endian float32, the image's own height x width, as the Python path's TIFF), and
// one JSON line in DIR/results.jsonl. Detection is lsr.detect.Detector.detect: encode, decode
// the direct reconstruction, resample with the native loop (csrc/resample, the same C++ as
// `--resampler native`), decode, post-process; noise and seeds as bundle.json "noise" says.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "image_io.h"
#include "json.h"
#include "resample/resample.h"
#include "sha256.h"

namespace fs = std::filesystem;

namespace {

constexpr int kBundleVersionMin = 1, kBundleVersionMax = 2;  // lsr.deploy.bundle.READ_VERSIONS

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Bundle {
  int image_size = 0, channels = 0, grid = 0, K = 0;
  double tau = 0, temperature = 1;
  int64_t seed = 0;
  int restorations = 1;
  std::map<std::string, fs::path> graphs;
};

Bundle read_bundle(const fs::path& dir) {
  const fs::path meta_path = dir / "bundle.json";
  if (!fs::is_directory(dir)) throw Error(dir.string() + ": bundle folder not found");
  std::ifstream f(meta_path);
  if (!f) throw Error(meta_path.string() + ": not an lsr bundle (bundle.json not found)");
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
    const double version = meta.at("bundle_version").number("bundle_version");
    if (!(version >= kBundleVersionMin && version <= kBundleVersionMax && version == std::floor(version)))
      throw Error("bundle version " + std::to_string(static_cast<int>(version)) + " is not supported (this runtime "
                  "reads versions " + std::to_string(kBundleVersionMin) + " to " + std::to_string(kBundleVersionMax) +
                  "); re-export with the matching lsr-export");
    const std::string& format = meta.at("format").string("format");
    if (format != "torchscript")
      throw Error("a " + format + " bundle; the C++ runtime runs TorchScript bundles "
                  "(lsr-export RUN --format torchscript --out DIR)");
    const auto& model = meta.at("model");
    b.image_size = static_cast<int>(model.at("image_size").number("model.image_size"));
    b.channels = static_cast<int>(model.at("channels").number("model.channels"));
    b.grid = static_cast<int>(model.at("grid_size").number("model.grid_size"));
    b.K = static_cast<int>(model.at("codebook_size").number("model.codebook_size"));
    const auto& det = meta.at("detect");
    b.tau = det.at("tau").number("detect.tau");
    b.temperature = det.at("temperature").number("detect.temperature");
    det.at("seed").number("detect.seed");
    try {
      b.seed = std::stoll(det.at("seed").str);  // the literal: seeds beyond 2^53 stay exact
    } catch (const std::exception&) {
      throw Error("detect.seed must be an integer");
    }
    b.restorations = static_cast<int>(det.at("restorations").number("detect.restorations"));
    if (b.channels != 1 && b.channels != 3) throw Error("model.channels must be 1 or 3");
    if (b.image_size < 1 || b.grid < 1 || b.K < 1 || b.restorations < 1 || !(b.temperature > 0))
      throw Error("model.image_size, grid_size, codebook_size, detect.restorations and temperature must be positive");
    // the four graphs, then prior_native (the prior on the native attention kernels, written
    // when lsr-export had the extension): this runtime links the op library, so it prefers it
    const auto& graphs = meta.at("graphs");
    for (const std::string name : {"encoder", "prior", "decoder", "postprocess", "prior_native"}) {
      if (name == "prior_native" && !graphs.has(name)) continue;
      const auto& g = graphs.at(name);
      const std::string& file = g.at("file").string("graphs." + name + ".file");
      if (fs::path(file).filename().string() != file)
        throw Error("graph file of " + name + " must be a plain file name in the bundle");
      const fs::path path = dir / file;
      if (!fs::is_regular_file(path))
        throw Error(path.string() + ": graph file missing from the bundle (" + name + " graph)");
      const std::string digest = lsr::sha256_file(path.string());
      if (digest != g.at("sha256").string("sha256"))
        throw Error(path.string() + ": sha256 " + digest.substr(0, 12) +
                    "... does not match bundle.json: the graph was edited or replaced after export");
      b.graphs[name == "prior_native" ? "prior" : name] = path;
    }
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (msg.rfind(dir.string(), 0) == 0) throw;  // already names a file of the bundle
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

void write_atomic(const fs::path& path, const std::string& bytes) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw Error(path.string() + ": cannot write");
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!f) throw Error(path.string() + ": write failed");
  }
  fs::rename(tmp, path);
}

int usage(const char* msg = nullptr) {
  if (msg) std::cerr << "lsr_detect: error: " << msg << "\n";
  std::cerr << "usage: lsr_detect BUNDLE IMAGE.png... --out DIR [--batch-size N] [--threads N]\n"
               "                  [--device cpu|cuda] [--tau X] [--seed N] [--restorations N] [--save-codes]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  fs::path out;
  int batch_size = 8, threads = 0;
  std::string device_name = "cpu";
  bool save_codes = false;
  double tau_override = std::nan("");
  int64_t seed_override = -1;
  int restorations_override = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&](const char* what) -> std::string {
      if (i + 1 >= argc) throw Error(std::string(what) + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--out") out = next("--out");
      else if (a == "--batch-size") batch_size = std::stoi(next("--batch-size"));
      else if (a == "--threads") threads = std::stoi(next("--threads"));
      else if (a == "--device") device_name = next("--device");
      else if (a == "--tau") tau_override = std::stod(next("--tau"));
      else if (a == "--seed") seed_override = std::stoll(next("--seed"));
      else if (a == "--restorations") restorations_override = std::stoi(next("--restorations"));
      else if (a == "--save-codes") save_codes = true;
      else if (a == "-h" || a == "--help") return usage(), 0;
      else if (a.rfind("--", 0) == 0) return usage(("unknown option " + a).c_str());
      else pos.push_back(a);
    } catch (const std::exception& e) {
      return usage(e.what());
    }
  }
  if (pos.size() < 2 || out.empty()) return usage("give a bundle, at least one image and --out DIR");
  if (batch_size < 1) return usage("--batch-size must be >= 1");
  try {
    if (threads > 0) at::set_num_threads(threads);
    Bundle b = read_bundle(pos[0]);
    if (!std::isnan(tau_override)) b.tau = tau_override;
    if (seed_override >= 0) b.seed = seed_override;
    if (restorations_override > 0) b.restorations = restorations_override;
    const c10::Device device(device_name);
    std::map<std::string, torch::jit::Module> m;
    for (const auto& [name, path] : b.graphs) {
      try {
        m.emplace(name, torch::jit::load(path.string(), device));
      } catch (const std::exception& e) {
        throw Error(path.string() + ": cannot load the TorchScript graph (" + std::string(e.what()).substr(0, 300) + ")");
      }
      m.at(name).eval();
    }
    std::vector<fs::path> paths(pos.begin() + 1, pos.end());
    for (const auto& p : paths) lsr::image::png_size(p.string());  // every input readable before any work
    fs::create_directories(out);
    const auto stems = unique_stems(paths);
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
        at::Tensor codes = m.at("encoder").forward({x}).toTensor();
        at::Tensor direct = m.at("decoder").forward({codes}).toTensor();
        at::Tensor chains = codes.repeat_interleave(n, 0);
        std::vector<at::Tensor> noise;
        for (size_t i = 0; i < B; ++i)
          for (int r = 0; r < n; ++r) noise.push_back(gumbel(chain_seed(b.seed, static_cast<int64_t>(start + i), r), T, b.K));
        auto rs = lsr::resample_incremental(m.at("prior"), chains, at::stack(noise).to(device), b.tau, b.temperature);
        at::Tensor restored = m.at("decoder").forward({rs.codes}).toTensor();
        auto post = m.at("postprocess")
                        .forward({x, direct, restored.view({static_cast<int64_t>(B), n, C, S, S})})
                        .toTuple()
                        ->elements();
        at::Tensor amap = post[0].toTensor().to(at::kCPU), score = post[1].toTensor().to(at::kCPU);
        at::Tensor direct_score = post[5].toTensor().to(at::kCPU);
        using at::indexing::Slice;
        at::Tensor lik = rs.likelihood.index({Slice(at::indexing::None, at::indexing::None, n)}).to(at::kCPU);
        at::Tensor nll = at::where(lik.lt(b.tau), -at::log(lik.clamp_min(1e-30)), at::zeros_like(lik)).flatten(1).sum(1);
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
          const int64_t p = passes[static_cast<int64_t>(i)].item<int64_t>();
          const int64_t e = evaluated[static_cast<int64_t>(i)].item<int64_t>();
          const int64_t later = p - n;
          std::ostringstream row;
          row << "{\"image\": " << lsr::json::quote(paths[start + i].string())
              << ", \"score\": " << fmt(score[static_cast<int64_t>(i)].item<double>())
              << ", \"nll_score\": " << fmt(nll[static_cast<int64_t>(i)].item<double>())
              << ", \"direct_score\": " << fmt(direct_score[static_cast<int64_t>(i)].item<double>())
              << ", \"n_resampled\": " << fmt(n_res[static_cast<int64_t>(i)].item<double>()) << ", \"prior_passes\": " << p
              << ", \"positions_evaluated\": " << e << ", \"recomputed_fraction\": "
              << (later > 0 ? fmt(static_cast<double>(e - n * T) / static_cast<double>(later * T)) : "null")
              << ", \"n_codes\": " << T << ", \"time_ms\": " << fmt(ms) << ", \"map_png\": " << lsr::json::quote(png.string())
              << ", \"map_raw\": " << lsr::json::quote(raw.string()) << ", \"map_shape\": [" << H << ", " << W << "]";
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
          std::cout << paths[start + i].string() << ": score " << fmt(score[static_cast<int64_t>(i)].item<double>())
                    << "  passes " << p << "  " << fmt(ms) << " ms\n";
        }
      }
    } catch (const std::exception& e) {
      // keep what is finished: the rows of the images done so far, then the error
      if (done > 0) write_atomic(out / "results.jsonl", lines.str());
      throw Error(std::string(e.what()) + (done > 0 ? " (results of the " + std::to_string(done) +
                                                         " images before it written to " +
                                                         (out / "results.jsonl").string() + ")"
                                                   : ""));
    }
    write_atomic(out / "results.jsonl", lines.str());
    std::cout << "results: " << (out / "results.jsonl").string() << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lsr_detect: error: " << e.what() << "\n";
    return 2;
  }
}
