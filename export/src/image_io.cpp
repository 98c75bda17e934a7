#include "image_io.h"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <memory>
#include <stdexcept>

namespace lsr::image {
namespace {

struct File {
  FILE* f = nullptr;
  ~File() {
    if (f) std::fclose(f);
  }
};

// libpng reports errors by longjmp (its documented protocol); throwing a C++ exception
// through libpng's C frames is not portable. The message goes into the error pointer.
struct PngError {
  char msg[200] = {0};
};
void png_error_fn(png_structp png, png_const_charp msg) {
  auto* e = static_cast<PngError*>(png_get_error_ptr(png));
  std::snprintf(e->msg, sizeof e->msg, "%s", msg ? msg : "unknown error");
  png_longjmp(png, 1);
}
void png_warning_fn(png_structp, png_const_charp) {}

// The setjmp frames: only trivially destructible locals between setjmp and any longjmp,
// so unwinding by longjmp skips no destructor. false: libpng failed (message in PngError).
// Every buffer is allocated in C++ between the frames, after the header's size is checked.
bool png_read_header(png_structp png, png_infop info, FILE* f) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_init_io(png, f);
  png_set_sig_bytes(png, 8);
  png_read_info(png, info);
  return true;
}
// The transforms of png_read_png(PNG_TRANSFORM_EXPAND): palette -> RGB, low-bit grey -> 8
// bit, tRNS -> alpha; interlaced images de-interlaced. `passes`: the interlace passes.
bool png_read_setup(png_structp png, png_infop info, int* passes) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_set_expand(png);
  *passes = png_set_interlace_handling(png);
  png_read_update_info(png, info);
  return true;
}
bool png_read_rows(png_structp png, png_infop info, png_bytepp rows) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_read_image(png, rows);
  png_read_end(png, info);
  return true;
}
// Decodes every row into the one buffer `row` (the pixels are dropped): checks the whole
// compressed stream (and its CRCs) with the memory of one row.
bool png_read_discard(png_structp png, png_infop info, png_bytep row, int passes, png_uint_32 height) {
  if (setjmp(png_jmpbuf(png))) return false;
  for (int p = 0; p < passes; ++p)
    for (png_uint_32 y = 0; y < height; ++y) png_read_row(png, row, nullptr);
  png_read_end(png, info);
  return true;
}
bool png_write_all(png_structp png, png_infop info, FILE* f, png_bytepp rows, int height, int width) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_init_io(png, f);
  png_set_IHDR(png, info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), 8, PNG_COLOR_TYPE_GRAY,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_set_rows(png, info, rows);
  png_write_png(png, info, PNG_TRANSFORM_IDENTITY, nullptr);
  return true;
}

// Opens `path`, checks the PNG signature and makes the read structs (error pointer `err`).
struct Reader {
  File file;
  png_structp png = nullptr;
  png_infop info = nullptr;
  PngError err;
  explicit Reader(const std::string& path) {
    file.f = std::fopen(path.c_str(), "rb");
    if (!file.f) throw std::runtime_error(path + ": cannot open (missing or unreadable)");
    unsigned char sig[8];
    if (std::fread(sig, 1, 8, file.f) != 8 || png_sig_cmp(sig, 0, 8) != 0)
      throw std::runtime_error(path + ": not a PNG file (the C++ runtime reads PNG images)");
    png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &err, png_error_fn, png_warning_fn);
    info = png ? png_create_info_struct(png) : nullptr;
    if (!png || !info) {
      png_destroy_read_struct(png ? &png : nullptr, nullptr, nullptr);
      throw std::runtime_error(path + ": out of memory");
    }
  }
  ~Reader() { png_destroy_read_struct(&png, &info, nullptr); }
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;
};

// Reads the header and checks the pixel limit; throws naming `path`.
std::pair<int, int> read_header(Reader& r, const std::string& path) {
  if (!png_read_header(r.png, r.info, r.file.f))
    throw std::runtime_error(path + ": cannot decode PNG, the file is truncated or corrupt (libpng: " + r.err.msg + ")");
  const uint64_t h = png_get_image_height(r.png, r.info), w = png_get_image_width(r.png, r.info);
  if (w * h > kMaxImagePixels)
    throw std::runtime_error(path + ": image too large (" + std::to_string(w) + " x " + std::to_string(h) + " = " +
                             std::to_string(w * h) + " pixels; the limit is " + std::to_string(kMaxImagePixels) +
                             ", Pillow's MAX_IMAGE_PIXELS, as lsr.images): refused before decoding");
  return {static_cast<int>(h), static_cast<int>(w)};
}

int setup(Reader& r, const std::string& path) {
  int passes = 1;
  if (!png_read_setup(r.png, r.info, &passes))
    throw std::runtime_error(path + ": cannot decode PNG, the file is truncated or corrupt (libpng: " + r.err.msg + ")");
  return passes;
}

}  // namespace

std::pair<int, int> png_size(const std::string& path) {
  Reader r(path);
  return read_header(r, path);
}

std::pair<int, int> verify_png(const std::string& path) {
  Reader r(path);
  const auto hw = read_header(r, path);
  const int passes = setup(r, path);
  std::vector<unsigned char> row(png_get_rowbytes(r.png, r.info));
  if (!png_read_discard(r.png, r.info, row.data(), passes, static_cast<png_uint_32>(hw.first)))
    throw std::runtime_error(path + ": cannot decode PNG, the file is truncated or corrupt (libpng: " + r.err.msg + ")");
  return hw;
}

Float read_png(const std::string& path) {
  Reader r(path);
  const int hh = read_header(r, path).first;
  setup(r, path);
  const size_t rowbytes = png_get_rowbytes(r.png, r.info);
  std::vector<unsigned char> pixels(rowbytes * static_cast<size_t>(hh));
  std::vector<png_bytep> row_ptrs(static_cast<size_t>(hh));
  for (int y = 0; y < hh; ++y) row_ptrs[static_cast<size_t>(y)] = pixels.data() + rowbytes * static_cast<size_t>(y);
  if (!png_read_rows(r.png, r.info, row_ptrs.data()))
    throw std::runtime_error(path + ": cannot decode PNG, the file is truncated or corrupt (libpng: " + r.err.msg + ")");
  png_structp png = r.png;
  png_infop info = r.info;
  Float out;
  const int w = static_cast<int>(png_get_image_width(png, info));
  const int h = static_cast<int>(png_get_image_height(png, info));
  const int depth = png_get_bit_depth(png, info);
  const int color = png_get_color_type(png, info);
  const int n_in = png_get_channels(png, info);
  const bool grey = !(color & PNG_COLOR_MASK_COLOR);
  out.channels = grey ? 1 : 3;
  out.height = h;
  out.width = w;
  out.data.assign(static_cast<size_t>(out.channels) * h * w, 0.f);
  png_bytepp rows = row_ptrs.data();
  const int bytes = depth == 16 ? 2 : 1;
  // as Pillow (so as lsr.images): a 16-bit grey PNG is read at 16 bits (I;16, / 65535), a
  // 16-bit colour or grey+alpha PNG is opened as 8-bit RGB(A) (its high bytes, / 255)
  const bool full16 = depth == 16 && color == PNG_COLOR_TYPE_GRAY;
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < out.channels; ++c) {
        const png_bytep px = rows[y] + (static_cast<size_t>(x) * n_in + c) * bytes;
        float v = full16 ? static_cast<float>((px[0] << 8) | px[1]) / 65535.0f : static_cast<float>(px[0]) / 255.0f;
        out.data[(static_cast<size_t>(c) * h + y) * w + x] = std::clamp(v, 0.0f, 1.0f);
      }
  return out;
}

Float to_channels(const Float& img, int channels) {
  if (img.channels == channels) return img;
  Float out;
  out.channels = channels;
  out.height = img.height;
  out.width = img.width;
  const size_t n = static_cast<size_t>(img.height) * img.width;
  out.data.resize(channels * n);
  if (channels == 1) {  // colour -> luma, as lsr.images (float32 0.299, 0.587, 0.114), clipped
    for (size_t i = 0; i < n; ++i) {
      const float v = img.data[i] * 0.299f + img.data[n + i] * 0.587f + img.data[2 * n + i] * 0.114f;
      out.data[i] = std::clamp(v, 0.0f, 1.0f);
    }
  } else {  // grey -> 3 identical channels
    for (int c = 0; c < 3; ++c) std::copy(img.data.begin(), img.data.begin() + n, out.data.begin() + c * n);
  }
  return out;
}

namespace {

// Pillow's precompute_coeffs (Resample.c) for the bilinear (triangle) filter.
struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // (xmin, count) per output pixel
  std::vector<double> k;    // ksize per output pixel
};

Coeffs precompute(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(2 * out_size);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0.0);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double* k = &c.k[static_cast<size_t>(xx) * c.ksize];
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      double t = (x + xmin - center + 0.5) * ss;
      if (t < 0) t = -t;
      const double w = t < 1.0 ? 1.0 - t : 0.0;
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x)
      if (ww != 0.0) k[x] /= ww;
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

}  // namespace

Float resize_bilinear(const Float& img, int height, int width) {
  if (img.height == height && img.width == width) return img;
  Float out;
  out.channels = img.channels;
  out.height = height;
  out.width = width;
  out.data.resize(static_cast<size_t>(img.channels) * height * width);
  const bool horiz = width != img.width, vert = height != img.height;
  const Coeffs ch = precompute(img.width, width), cv = precompute(img.height, height);
  for (int c = 0; c < img.channels; ++c) {
    const float* in = img.data.data() + static_cast<size_t>(c) * img.height * img.width;
    // horizontal pass over the source rows the vertical pass will read (Pillow's order)
    int y_first = 0, y_last = img.height;
    if (vert) {
      y_first = cv.bounds[0];
      y_last = cv.bounds[2 * height - 2] + cv.bounds[2 * height - 1];
    }
    std::vector<float> tmp;
    const float* src = in;
    int src_w = img.width, row0 = 0;
    if (horiz) {
      tmp.resize(static_cast<size_t>(y_last - y_first) * width);
      for (int y = y_first; y < y_last; ++y)
        for (int xx = 0; xx < width; ++xx) {
          const int xmin = ch.bounds[2 * xx], n = ch.bounds[2 * xx + 1];
          const double* k = &ch.k[static_cast<size_t>(xx) * ch.ksize];
          double ss = 0.0;
          for (int x = 0; x < n; ++x) ss += in[static_cast<size_t>(y) * img.width + xmin + x] * k[x];
          tmp[static_cast<size_t>(y - y_first) * width + xx] = static_cast<float>(ss);
        }
      src = tmp.data();
      src_w = width;
      row0 = y_first;
    }
    float* dst = out.data.data() + static_cast<size_t>(c) * height * width;
    if (vert) {
      for (int yy = 0; yy < height; ++yy) {
        const int ymin = cv.bounds[2 * yy] - row0, n = cv.bounds[2 * yy + 1];
        const double* k = &cv.k[static_cast<size_t>(yy) * cv.ksize];
        for (int xx = 0; xx < width; ++xx) {
          double ss = 0.0;
          for (int y = 0; y < n; ++y) ss += src[static_cast<size_t>(ymin + y) * src_w + xx] * k[y];
          dst[static_cast<size_t>(yy) * width + xx] = static_cast<float>(ss);
        }
      }
    } else {
      std::copy(src, src + static_cast<size_t>(height) * width, dst);
    }
    for (size_t i = 0; i < static_cast<size_t>(height) * width; ++i) dst[i] = std::clamp(dst[i], 0.0f, 1.0f);
  }
  return out;
}

void write_png_gray8(const std::string& path, const std::vector<uint8_t>& pixels, int height, int width) {
  // to a temporary file, renamed over `path` once complete: an earlier map is never half overwritten
  const std::string tmp = path + ".tmp";
  {
    File file;
    file.f = std::fopen(tmp.c_str(), "wb");
    if (!file.f) throw std::runtime_error(path + ": cannot write");
    PngError err;
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &err, png_error_fn, png_warning_fn);
    png_infop info = png ? png_create_info_struct(png) : nullptr;
    if (!png || !info) {
      png_destroy_write_struct(png ? &png : nullptr, nullptr);
      throw std::runtime_error(path + ": out of memory");
    }
    std::vector<png_bytep> rows(height);
    for (int y = 0; y < height; ++y) rows[y] = const_cast<png_bytep>(pixels.data() + static_cast<size_t>(y) * width);
    const bool ok = png_write_all(png, info, file.f, rows.data(), height, width);
    png_destroy_write_struct(&png, &info);
    if (!ok) {
      std::fclose(file.f);
      file.f = nullptr;
      std::remove(tmp.c_str());
      throw std::runtime_error(path + ": cannot write PNG (libpng: " + err.msg + ")");
    }
    const bool closed = std::fclose(file.f) == 0;
    file.f = nullptr;
    if (!closed) {
      std::remove(tmp.c_str());
      throw std::runtime_error(path + ": cannot write PNG (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename the finished PNG into place");
  }
}

}  // namespace lsr::image
