// Launch geometry shared by the .cu launchers and the host checks of registration.cpp, which refuses
// problems whose grid would not fit before anything is launched (the .cu host code never throws).
#pragma once

#include <cstdint>

namespace dlsn {
namespace cuda_impl {

constexpr int kTile = 32;    // query rows and key rows per attention tile
constexpr int kCols = 128;   // output columns (of Cv or Cm) owned by one attention block
constexpr int64_t kMaxGridX = 2147483647;  // CUDA's limit on gridDim.x
constexpr int64_t kMaxGridY = 65535;       // and on gridDim.y

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda_impl
}  // namespace dlsn
